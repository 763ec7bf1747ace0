"""Runs vimage.main() on many (argv) cases in one process, with an address
space limit and a per-case alarm, and prints one JSON line per case:
{"argv", "code", "err", "fault"}.  Used by test_headers.py: a bad header must
give a clean message or report, never a traceback, a hang or a huge
allocation (which would hit the limit and show as a MemoryError)."""
import contextlib
import io
import json
import os
import resource
import signal
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vimage  # noqa: E402

LIMIT = 1 << 30          # 1 GiB of address space: far above what these small images need


class Hang(Exception):
    pass


def alarm(_signum, _frame):
    raise Hang()


def main():
    cases = json.load(sys.stdin)
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))
    signal.signal(signal.SIGALRM, alarm)
    os.environ["VIMAGE_DEBUG"] = "1"          # a bug raises instead of "internal error"
    for argv in cases:
        out, err = io.StringIO(), io.StringIO()
        fault = None
        signal.alarm(20)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = vimage.main(argv)
        except Hang:
            code, fault = None, "hang"
        except MemoryError:
            code, fault = None, "memory"
        except SystemExit as e:
            code = e.code
        except BaseException:
            code, fault = None, traceback.format_exc()
        finally:
            signal.alarm(0)
        if fault is None and "out of memory" in err.getvalue():
            fault = "memory"
        print(json.dumps({"argv": argv, "code": code, "err": err.getvalue()[-2000:],
                          "fault": fault}), flush=True)


if __name__ == "__main__":
    main()
