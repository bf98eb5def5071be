"""Several command lines in one Python process, each run as `python -m MODULE ARGS` runs it: `runpy` executes the
module as `__main__` with its own `sys.argv`, and its exit status, stdout and stderr are caught one by one. A test
that checks many commands' bad-input handling pays one interpreter start (about 10 s of imports on 2 cores) instead of
one per command.

    python tests/one_process.py COMMANDS.json OUT.json

COMMANDS.json: a list of [module, [args...]]; OUT.json: a list of {returncode, stdout, stderr}. An exception that
escapes a command is printed with its traceback and gives status 1, as the interpreter does."""

import contextlib
import io
import json
import runpy
import sys
import traceback
import warnings


def run_module(module: str, args: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = [module, *args]
        try:
            with warnings.catch_warnings():  # the module may be imported already (by the test, or a command before):
                # it runs afresh as __main__ all the same, as under `python -m`
                warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, int | None):
                print(stop.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001  # what the interpreter does with an uncaught error
            traceback.print_exc()
            code = 1
        finally:
            sys.argv = argv
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    commands = json.loads(open(sys.argv[1]).read())
    results = [run_module(module, [str(arg) for arg in args]) for module, args in commands]
    with open(sys.argv[2], "w") as handle:
        json.dump(results, handle)
