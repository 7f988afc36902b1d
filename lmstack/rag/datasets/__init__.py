"""Question sets for evaluating the RAG stage: ``wiki-questions`` over the offline Wikipedia sample
(see ``build_questions``)."""
