"""Evaluation: metrics (``metrics``, ``meteor``, ``bertscore``, ``retrieval``), the code sandbox
and pass@k (``code_exec``), shipped data sets (``datasets``), and the harness (``tasks``, the task
kinds in ``kinds`` and ``judge_tasks``, ``items``, ``calls``, ``scoring``, ``stats``, ``gates``,
``report``). See docs/eval.md."""
