"""Process state that reachable user code may read: environment variables pinned by name, the rest refused.

NOTE [Process state]
A forward that reads the environment, the command line, files, the clock or a random generator computes a
graph that depends on something no code digest shows: the same code in another process (``MODE=b`` instead
of ``MODE=a``) would trace another graph. The walker (:mod:`aotcache.autograd_cache.reachable`) asks this
module about every user function and every library module attribute that user code names:

* an environment variable read with a constant name (``os.environ["X"]``, ``os.environ.get("X"[, const])``,
  ``"X" in os.environ``, ``os.getenv("X"[, const])``, also through ``from os import environ, getenv``) is
  *pinned*: its value (or its absence) joins the function's token, hence the fingerprint, and the
  in-process guards re-check it on every call;
* any other use of ``os.environ`` / ``os.getenv`` (a computed name, iterating, copying, writing) and every
  read the walker cannot pin (``sys.argv``, ``open``/``input``, file-system queries of ``os`` / ``os.path``,
  torch's thread counts, random seeds and states, and the modules in :data:`PROCESS_STATE_MODULES`: clocks,
  random generators, files, sockets, subprocesses) makes the result untrusted with the reason
  ``process state: <what>``, so the full key (computed from the captured graph) decides.

The checks read bytecode and module attribute names only; nothing is run. They only ever refuse more, never
less: an attribute named ``environ`` on some other object is scanned as if it were ``os.environ``.
"""

from __future__ import annotations

import dis
import functools
import types
from collections.abc import Iterable

from aotcache.autograd_cache.code_reading import global_names

__all__ = ["PROCESS_STATE_MODULES", "ENV_ACCESSORS", "env_reads", "module_attribute_reason", "module_reason",
           "builtin_reads_reason"]

# Modules whose every attribute reads or changes process state (time, randomness, files, the network).
PROCESS_STATE_MODULES = frozenset({
    "time", "random", "_random", "datetime", "_datetime", "secrets", "uuid", "socket", "subprocess", "glob",
    "shutil", "tempfile", "pathlib", "io", "_io", "fileinput", "getpass", "select", "signal", "resource",
    "numpy.random", "mmap", "sqlite3", "urllib.request", "http.client",
})
# Attributes of otherwise-harmless modules that read process state.
_UNPINNABLE_ATTRIBUTES: dict[str, frozenset[str]] = {
    # names only: the walker matches them against every attribute name the code uses, so generic names
    # (``read``, ``open``, ``times``) would refuse code that merely has such an attribute elsewhere
    "os": frozenset({"listdir", "scandir", "stat", "lstat", "getpid", "getppid", "urandom", "cpu_count",
                     "process_cpu_count", "sched_getaffinity", "getcwd", "getcwdb", "walk", "fwalk",
                     "getloadavg", "fdopen", "popen", "readlink", "uname", "getlogin", "getuid", "geteuid",
                     "getgid", "environb", "getenvb", "get_terminal_size", "statvfs", "getrandom"}),
    "sys": frozenset({"argv", "orig_argv", "stdin"}),
    "builtins": frozenset({"open", "input"}),
    # torch's readers of per-process settings no part of the fingerprint holds (found in review: a forward's
    # ``self.threads = torch.get_num_threads()`` was replayed into a process with another thread count, NOTE
    # [Replaying a call's state change]); distinctive names only (``seed`` is too common an attribute name)
    "torch": frozenset({"get_num_threads", "get_num_interop_threads", "initial_seed", "get_rng_state"}),
    "torch.random": frozenset({"initial_seed", "get_rng_state"}),
    "torch.cuda": frozenset({"initial_seed", "get_rng_state", "get_rng_state_all"}),
}
for _path_module in ("posixpath", "ntpath", "genericpath"):
    _UNPINNABLE_ATTRIBUTES[_path_module] = frozenset({
        "exists", "lexists", "isfile", "isdir", "islink", "ismount", "isjunction", "getmtime", "getatime",
        "getctime", "getsize", "realpath", "abspath", "expanduser", "expandvars", "samefile", "sameopenfile"})
# Names through which code reaches the environment (``os.environ`` / ``os.getenv`` or imported from os).
ENV_ACCESSORS = frozenset({"environ", "getenv"})
_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD", "LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_FAST",
                    "LOAD_CLASSDEREF"})
_CALLS = frozenset({"PRECALL", "CALL", "CALL_FUNCTION"})
_UNPINNABLE_BUILTINS = frozenset({"open", "input"})


def module_reason(module_name: str | None) -> str | None:
    """``process state: <module>`` when code of (or an object from) ``module_name`` reads process state."""
    name = module_name or ""
    if name in PROCESS_STATE_MODULES or name.split(".")[0] in PROCESS_STATE_MODULES:
        return f"process state: {name}"
    return None


def module_attribute_reason(module_name: str, attribute: str) -> str | None:
    """Why reading ``attribute`` of the module ``module_name`` cannot be pinned, or None when it can."""
    if module_name in PROCESS_STATE_MODULES or module_name.split(".")[0] in PROCESS_STATE_MODULES:
        return f"process state: {module_name}.{attribute}"
    if attribute in _UNPINNABLE_ATTRIBUTES.get(module_name, ()):
        return f"process state: {'os.path' if module_name.endswith('path') else module_name}.{attribute}"
    return None


def _instructions(code: types.CodeType) -> Iterable[list[dis.Instruction]]:
    """The instructions of ``code`` and of every code object nested in it, one list per code object."""
    codes = [code]
    while codes:
        current = codes.pop()
        codes.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
        yield [i for i in dis.get_instructions(current) if i.opname not in ("CACHE", "EXTENDED_ARG")]


def builtin_reads_reason(code: types.CodeType, names: set[str], globals_: dict) -> str | None:
    """``process state: open`` when the code calls the builtin ``open`` / ``input`` (not shadowed by a global)."""
    candidates = (names & _UNPINNABLE_BUILTINS) - globals_.keys()
    for name in sorted(candidates & global_names(code)):
        return f"process state: {name}"
    return None


def _is_string_constant(instruction: dis.Instruction | None) -> bool:
    return (instruction is not None and instruction.opname == "LOAD_CONST" and isinstance(instruction.argval, str)
            and not instruction.is_jump_target)


def _constant_call(instructions: list[dis.Instruction], start: int) -> str | None:
    """The name when ``instructions[start:]`` are ``CONST [CONST] CALL``: a call with a constant name (and
    at most a constant default), else None."""
    at = lambda index: instructions[index] if index < len(instructions) else None  # noqa: E731
    if not _is_string_constant(at(start)):
        return None
    following = at(start + 1)
    if following is not None and following.opname == "LOAD_CONST" and not following.is_jump_target:
        following = at(start + 2)
    if following is None or following.opname not in _CALLS or following.is_jump_target:
        return None
    return at(start).argval


@functools.lru_cache(maxsize=4096)
def env_reads(code: types.CodeType) -> tuple[tuple[str, ...], str | None]:
    """The environment variable names ``code`` reads with constant names, and the reason it cannot be pinned
    (None when every use of ``environ`` / ``getenv`` is one of the pinned forms, NOTE [Process state])."""
    found: set[str] = set()
    for instructions in _instructions(code):
        for index, instruction in enumerate(instructions):
            if instruction.opname not in _LOADS or instruction.argval not in ENV_ACCESSORS:
                continue
            after = instructions[index + 1] if index + 1 < len(instructions) else None
            name: str | None = None
            if instruction.argval == "getenv":
                name = _constant_call(instructions, index + 1)
            elif after is not None and after.opname in ("LOAD_ATTR", "LOAD_METHOD") and after.argval == "get":
                name = _constant_call(instructions, index + 2)
            elif _is_string_constant(after) and index + 2 < len(instructions) and (
                    instructions[index + 2].opname == "BINARY_SUBSCR"
                    or (instructions[index + 2].opname == "BINARY_OP" and instructions[index + 2].argrepr == "[]")):
                name = after.argval
            elif after is not None and after.opname == "CONTAINS_OP":
                # ``"X" in os.environ``: the left operand is exactly a constant when the instruction before the
                # ``os.environ`` load is that constant (any other expression ends with its operator)
                first = index - 1 if instruction.opname == "LOAD_ATTR" else index
                loader = instructions[first] if first >= 0 else None
                before = instructions[first - 1] if first >= 1 else None
                if loader is not None and not loader.is_jump_target and _is_string_constant(before):
                    name = before.argval
            if name is None:
                return (), f"process state: os.{instruction.argval} read with a non-constant name or as a whole"
            found.add(name)
    return tuple(sorted(found)), None
