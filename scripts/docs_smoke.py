#!/usr/bin/env python3
"""Docs smoke test: a fresh clone, the README's commands, then every documented shell command.

    python scripts/docs_smoke.py                      # committed HEAD, true fresh set-up
    python scripts/docs_smoke.py --worktree --reuse-venv .venv --exclude pytest

The repository's committed HEAD is cloned into a temporary folder (`--worktree` lays the
working tree's uncommitted and untracked, not ignored, files over it). Then the shell
commands of README.md and of every docs/*.md page run there, page by page and in page
order, each with `bash -c` in the clone's root, an empty stdin and a per-command timeout.
README.md comes first (its first commands are the set-up), then the docs pages in the
order README.md links them, then the pages it does not link, by name. Nothing activates
the clone's `.venv`, as for a new user: the docs name `.venv/bin/lmstack`. `$LMSTACK_CACHE`
is a fresh folder, so the first GGUF load is a first load.

A command is a line of a fenced block tagged bash, sh, shell or console: `$ ` prompts are
dropped, and in a console block only prompted lines are commands (the rest is output);
a line ending in a backslash continues on the next; blank lines and comment lines are not
commands. Commands that cannot run as they are carry an annotation in the page's source,
an HTML comment right above the block (blank lines and other annotations may sit between):

    <!-- smoke: skip: REASON -->            no command of the block runs; REASON is listed
    <!-- smoke: skip 3: REASON -->          command 3 of the block (1-based; 1,3 and 2-4 work too)
    <!-- smoke: background 1: URL -->       a server: it runs in the background, the page goes on
                                            once URL answers 200, and it is stopped at the end
                                            of the page
    <!-- smoke: env 2: KEY=VALUE ... -->    extra environment (no number: every command of the block)
    <!-- smoke: timeout 2: SECONDS -->      a longer (or shorter) limit than --timeout
    <!-- smoke: exit 2: 1 -->               the exit status the page documents for command 2
                                            (default 0), e.g. a gate that fails on purpose

A malformed annotation, a number past the block's end or an annotation that no shell
block follows is an error (exit status 2, before anything runs), so that none is silently
ignored. Every skipped command is
listed with its reason at the end; the exit status is 1 when any command failed (ended
with another status than its expected one, or ran past its timeout).

This script is stdlib only: it runs before the clone has a virtual environment.
Deliberately left out: heredocs, interactive input (stdin is empty), Python blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

SHELL_LANGS = ("bash", "sh", "shell", "console")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
ANNOTATION = re.compile(r"^\s*<!--\s*smoke:\s*(?P<body>.*?)\s*-->\s*$")
DIRECTIVE = re.compile(r"^(?P<verb>[a-z]+)\s*(?P<targets>[0-9][0-9,\- ]*)?:\s*(?P<arg>.*)$")
VERBS = ("skip", "background", "env", "timeout", "exit")
TAIL_LINES = 40


class DocsError(ValueError):
    """A malformed page: the message names the page, the line and what was expected."""


@dataclass
class Command:
    page: str
    line: int                      # 1-based line of the command's first line in the page
    text: str                      # continuation lines joined, prompt removed
    skip: str | None = None        # reason, when the command is not run
    background: str | None = None  # readiness URL of a server command
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    expect: int = 0                # the exit status the page documents


@dataclass
class Result:
    page: str
    line: int
    command: str
    status: str                    # ok, failed, timeout, skipped, background
    exit_code: int | None
    seconds: float
    reason: str = ""
    log: str = ""


# ---------------------------------------------------------------- extraction

def _targets(spec: str | None, n: int, where: str) -> list[int]:
    """'1', '1,3', '2-4' -> 0-based indices; None -> every command of the block."""
    if not spec or not spec.strip():
        return list(range(n))
    out = []
    for part in spec.replace(" ", "").split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise DocsError(f"{where}: command number {part!r} is not N, N,M or N-M")
        first, last = int(lo), int(hi or lo)
        if first > last:
            raise DocsError(f"{where}: command range {part} runs backwards")
        if first < 1 or last > n:
            raise DocsError(f"{where}: command {part} is not in the block, which has {n} command(s), numbered from 1")
        out.extend(range(first - 1, last))
    return out


def _apply(annotations: list[tuple[int, str]], commands: list[Command], page: str) -> None:
    for line, body in annotations:
        where = f"{page}:{line}"
        m = DIRECTIVE.match(body)
        if not m or m["verb"] not in VERBS:
            raise DocsError(f"{where}: annotation {body!r} is not 'VERB [N]: ARG' with VERB one of "
                            f"{', '.join(VERBS)}")
        verb, arg = m["verb"], m["arg"].strip()
        if not arg:
            raise DocsError(f"{where}: annotation '{verb}' needs a value after the colon")
        for i in _targets(m["targets"], len(commands), where):
            cmd = commands[i]
            if verb == "skip":
                cmd.skip = arg
            elif verb == "background":
                if not arg.startswith(("http://", "https://")):
                    raise DocsError(f"{where}: background needs the URL that answers once the "
                                    f"server is up, got {arg!r}")
                cmd.background = arg
            elif verb == "env":
                for pair in shlex.split(arg):
                    key, eq, value = pair.partition("=")
                    if not eq or not key:
                        raise DocsError(f"{where}: env expects KEY=VALUE pairs, got {pair!r}")
                    cmd.env[key] = value
            elif verb == "timeout":
                try:
                    cmd.timeout = float(arg)
                except ValueError:
                    raise DocsError(f"{where}: timeout expects seconds, got {arg!r}") from None
            else:
                if not arg.isdigit() or int(arg) > 255:
                    raise DocsError(f"{where}: exit expects an exit status 0-255, got {arg!r}")
                cmd.expect = int(arg)


def _block_commands(lines: list[tuple[int, str]], lang: str, page: str) -> list[Command]:
    """The commands of one fenced block; `lines` are (1-based line number, text)."""
    commands: list[Command] = []
    pending: Command | None = None   # a command whose last line ended in a backslash
    for number, raw in lines:
        text = raw.rstrip()
        if pending is not None:
            part = text[2:] if lang == "console" and text.startswith("> ") else text.strip()
            pending.text += " " + part.rstrip("\\").strip()
            if not text.endswith("\\"):
                pending = None
            continue
        stripped = text.strip()
        prompted = stripped.startswith("$ ") or stripped == "$"
        if lang == "console" and not prompted:
            continue                  # output
        if prompted:
            stripped = stripped[1:].strip()
        if not stripped or stripped.startswith("#"):
            continue
        cmd = Command(page, number, stripped.rstrip("\\").strip())
        commands.append(cmd)
        if stripped.endswith("\\"):
            pending = cmd
    if pending is not None:
        raise DocsError(f"{page}:{pending.line}: the command ends in a backslash at the end of its block")
    return commands


def extract(page: str, text: str) -> list[Command]:
    """Every shell command of one Markdown page, in page order, annotations applied."""
    commands: list[Command] = []
    annotations: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        ann = ANNOTATION.match(line)
        if ann:
            annotations.append((i + 1, ann["body"]))
            i += 1
            continue
        if fence:
            mark, info = fence["fence"], fence["info"].strip()
            lang = info.split()[0].lower() if info else ""
            body = []
            j = i + 1
            while j < len(lines) and not (lines[j].strip().startswith(mark[0] * len(mark))
                                          and not lines[j].strip().strip(mark[0])):
                body.append((j + 1, lines[j]))
                j += 1
            if lang in SHELL_LANGS:
                block = _block_commands(body, lang, page)
                _apply(annotations, block, page)
                commands.extend(block)
            elif annotations:
                raise DocsError(f"{page}:{annotations[0][0]}: the annotation is followed by a "
                                f"{lang or 'untagged'} block, not one of {', '.join(SHELL_LANGS)}")
            annotations = []
            i = j + 1
            continue
        if annotations and line.strip():
            raise DocsError(f"{page}:{annotations[0][0]}: the annotation is not followed by a fenced "
                            f"shell block (found {line.strip()[:60]!r} first)")
        i += 1
    if annotations:
        raise DocsError(f"{page}:{annotations[0][0]}: the annotation is not followed by a fenced shell block")
    return commands


def page_order(root: Path) -> list[str]:
    """README.md, the docs pages in the order README.md links them, then the rest by name."""
    readme = (root / "README.md").read_text(encoding="utf-8")
    pages = sorted(p.relative_to(root).as_posix() for p in (root / "docs").glob("*.md"))
    linked = []
    for m in re.finditer(r"\]\((docs/[^)#\s]+\.md)", readme):
        if m[1] in pages and m[1] not in linked:
            linked.append(m[1])
    return ["README.md"] + linked + [p for p in pages if p not in linked]


# ---------------------------------------------------------------- set-up

def clone(src: Path, dest: Path, worktree: bool) -> None:
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(src), str(dest)], check=True)
    if not worktree:
        return
    def git_list(*args: str) -> list[str]:
        out = subprocess.run(["git", "-C", str(src), "ls-files", "-z", *args],
                             check=True, capture_output=True).stdout.decode()
        return [p for p in out.split("\0") if p]
    deleted = set(git_list("--deleted"))
    for rel in git_list("--modified", "--others", "--exclude-standard"):
        if rel in deleted:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dest / rel)
    for rel in deleted:
        (dest / rel).unlink(missing_ok=True)


def copy_venv(venv: Path, dest: Path) -> None:
    """A copy of an existing virtual environment, without the package that set-up installs.

    The copy's scripts name the copy's interpreter, and its editable install of lmstack
    (which points at the source checkout) is removed, so the clone's set-up installs the
    clone itself and a failed install cannot silently test the original checkout.
    """
    venv = venv.resolve()
    subprocess.run(["cp", "-a", str(venv), str(dest)], check=True)
    for path in (dest / "bin").iterdir():
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if str(venv).encode() in data:
            mode = path.stat().st_mode
            path.unlink()        # a new file: never write through to the original
            path.write_bytes(data.replace(str(venv).encode(), str(dest).encode()))
            path.chmod(mode)
    for site in dest.glob("lib/python*/site-packages"):
        for entry in site.iterdir():
            if re.match(r"(__editable__[._]+)?lmstack([-_.].*)?$", entry.name):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


# ---------------------------------------------------------------- running

def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _tail(log: Path, n: int = TAIL_LINES, width: int = 300) -> str:
    """The last lines of a log; progress bars redraw with a carriage return, so it ends a line too."""
    lines = [line for line in log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
             if line.strip()]
    return "\n".join(line if len(line) <= width else line[:width] + " ..." for line in lines[-n:])


def _wait_ready(url: str, proc: subprocess.Popen, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    return False


def run_page(commands: list[Command], workdir: Path, env: dict[str, str], timeout: float,
             logs: Path, counter: list[int], echo) -> list[Result]:
    results: list[Result] = []
    servers: list[tuple[subprocess.Popen, Result]] = []
    try:
        for cmd in commands:
            if cmd.skip is not None:
                results.append(Result(cmd.page, cmd.line, cmd.text, "skipped", None, 0.0, cmd.skip))
                echo(results[-1])
                continue
            counter[0] += 1
            log = logs / f"{counter[0]:03d}-{re.sub(r'[^A-Za-z0-9]+', '-', cmd.page)}-{cmd.line}.log"
            limit = cmd.timeout or timeout
            start = time.monotonic()
            with open(log, "wb") as out:
                proc = subprocess.Popen(["bash", "-c", cmd.text], cwd=workdir, env={**env, **cmd.env},
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            if cmd.background:
                ready = _wait_ready(cmd.background, proc, start + limit)
                res = Result(cmd.page, cmd.line, cmd.text, "background" if ready else "failed",
                             proc.poll(), time.monotonic() - start, "" if ready else
                             f"{cmd.background} did not answer 200 within {limit:.0f} s", str(log))
                if ready:
                    servers.append((proc, res))
                else:
                    _stop(proc)
            else:
                try:
                    code = proc.wait(timeout=limit)
                    status = "ok" if code == cmd.expect else "failed"
                    reason = f"exit {code}, expected {cmd.expect}" if cmd.expect and code != cmd.expect else ""
                except subprocess.TimeoutExpired:
                    _stop(proc)
                    code, status, reason = None, "timeout", f"still running after {limit:.0f} s"
                except BaseException:    # Ctrl-C or SIGTERM: the command runs in its own session
                    _stop(proc)
                    raise
                res = Result(cmd.page, cmd.line, cmd.text, status, code, time.monotonic() - start, reason, str(log))
            results.append(res)
            echo(res)
    finally:
        for proc, res in servers:
            if proc.poll() is not None:     # a server that died during the page failed
                res.status, res.exit_code = "failed", proc.returncode
                res.reason = f"the server exited (status {proc.returncode}) before the end of its page"
            _stop(proc)
    return results


def _echo(res: Result) -> None:
    code = "" if res.exit_code is None else f" exit {res.exit_code}"
    print(f"[{res.status:>10}] {res.page}:{res.line} {res.seconds:7.1f}s{code}  {res.command}", flush=True)
    if res.status in ("failed", "timeout"):
        if res.reason:
            print(f"             {res.reason}")
        if res.log:
            print(f"             log {res.log}, last lines:")
            print("\n".join("    | " + line for line in _tail(Path(res.log)).splitlines()), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="the repository to clone (default: this script's)")
    ap.add_argument("--worktree", action="store_true",
                    help="lay the working tree's uncommitted and untracked files over the clone of HEAD")
    ap.add_argument("--reuse-venv", type=Path, metavar="PATH",
                    help="copy this virtual environment into the clone instead of the fresh one "
                         "set-up would build (set-up still runs and installs the clone)")
    ap.add_argument("--workdir", type=Path,
                    help="clone here and keep it (default: a temporary folder, removed on success); "
                         "a folder that already holds a clone is reused as it is, to run page by page")
    ap.add_argument("--pages", nargs="+", metavar="PAGE",
                    help="run only these pages (e.g. README.md docs/data.md), in page order")
    ap.add_argument("--exclude", metavar="REGEX",
                    help="do not run commands that match REGEX (listed as skipped, with the pattern)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per command (default 600)")
    ap.add_argument("--report", type=Path, help="also write every result as JSON here")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # unwinds, so running commands are stopped

    repo = args.repo.resolve()
    order = page_order(repo)
    if args.pages:
        unknown = [p for p in args.pages if p not in order]
        if unknown:
            ap.error(f"--pages: {', '.join(unknown)} not among the pages {', '.join(order)}")
    try:
        exclude = re.compile(args.exclude) if args.exclude else None
    except re.error as e:
        ap.error(f"--exclude: {args.exclude!r} is not a regular expression ({e})")

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="lmstack-docs-smoke-"))).resolve()
    if (workdir / ".git").is_dir():
        print(f"reusing the clone in {workdir}", flush=True)
    else:
        workdir.parent.mkdir(parents=True, exist_ok=True)
        print(f"cloning {repo} {'(HEAD + working tree)' if args.worktree else '(HEAD)'} into {workdir}", flush=True)
        clone(repo, workdir, args.worktree)
        if args.reuse_venv:
            if not (args.reuse_venv / "bin" / "python").exists():
                ap.error(f"--reuse-venv: {args.reuse_venv} has no bin/python")
            print(f"copying {args.reuse_venv} into the clone", flush=True)
            copy_venv(args.reuse_venv, workdir / ".venv")

    # Pages are read from the clone: what runs is what the clone documents.
    pages = page_order(workdir)
    try:
        per_page = {p: extract(p, (workdir / p).read_text(encoding="utf-8")) for p in pages}
    except DocsError as e:
        print(f"docs_smoke: error: {e}", file=sys.stderr)
        return 2
    logs = workdir / ".smoke-logs"
    logs.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LMSTACK_DOCS_SMOKE", "VIRTUAL_ENV", "PYTHONPATH")}
    # An activated virtual environment's bin stays off PATH: it would answer for `lmstack`.
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not (Path(p).parent / "pyvenv.cfg").exists())
    env["LMSTACK_CACHE"] = str(workdir / ".smoke-cache")

    results: list[Result] = []
    counter = [len(list(logs.iterdir()))]   # logs of earlier runs in a reused clone stay
    for page in pages:
        commands = per_page[page]
        if args.pages and page not in args.pages:
            continue
        for cmd in commands:
            if exclude and cmd.skip is None and exclude.search(cmd.text):
                cmd.skip = f"excluded by --exclude {args.exclude!r}"
        if commands:
            print(f"== {page}: {len(commands)} command(s)", flush=True)
        results += run_page(commands, workdir, env, args.timeout, logs, counter, _echo)

    failed = [r for r in results if r.status in ("failed", "timeout")]
    skipped = [r for r in results if r.status == "skipped"]
    ran = [r for r in results if r.status != "skipped"]
    print(f"\n{len(ran)} command(s) run in {sum(r.seconds for r in ran):.0f} s: "
          f"{len(ran) - len(failed)} passed, {len(failed)} failed; {len(skipped)} skipped")
    for r in failed:
        print(f"  FAILED  {r.page}:{r.line}  {r.command}  ({r.reason or f'exit {r.exit_code}'})")
    for r in skipped:
        print(f"  skipped {r.page}:{r.line}  {r.command}  ({r.reason})")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.report.with_name(args.report.name + ".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n", encoding="utf-8")
        tmp.replace(args.report)
    if failed or args.workdir:
        print(f"the clone and its logs are kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
