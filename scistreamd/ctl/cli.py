"""scistreamctl's entry point: parse, run the verb, print; never a traceback."""

from __future__ import annotations

import os
import sys

from ..errors import ScistreamError
from .errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    PROG,
    CtlError,
    _one_line,
    error_from_exception,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # annotations only: importing typing costs every CLI start ~3 ms
    from typing import List, Optional


def _report(err: CtlError, as_json: bool) -> int:
    message = err.message.replace("\n", " ")
    print(f"{PROG}: {message}", file=sys.stderr)
    if as_json:
        import json

        print(json.dumps({"error": err.name, "message": message, "exit_code": err.exit_code}))
    return err.exit_code


def main(argv: Optional[List[str]] = None) -> int:
    """Run scistreamctl; returns the exit code (never raises, never prints a traceback)."""
    # Imported here, and the verbs only after parsing: --version and --help need
    # neither the bus client nor the verbs (start-up time; logging alone is ~6 ms).
    from .args import parse_args

    args_list = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("SCISTREAMCTL_DEBUG"):
        import logging

        logging.basicConfig(level=logging.DEBUG, format=f"{PROG}: %(name)s: %(message)s")
    # Known before parsing succeeds, so usage errors can be reported as JSON too.
    as_json = "--json" in args_list
    try:
        try:
            args = parse_args(args_list)
            as_json = args.json
            from .verbs import VERBS

            text, data = VERBS[args.verb](args)
        except CtlError as err:  # before its base: already the report
            return _report(err, as_json)
        except ScistreamError as err:
            return _report(error_from_exception(err), as_json)
        except SystemExit as exc:  # --help / --version
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        if data is None and not text:  # a verb that printed as it went (watch)
            pass
        elif as_json:
            import json

            print(json.dumps(data, indent=2))
        else:
            sys.stdout.write(text)
        sys.stdout.flush()
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (| head): no traceback, and none at interpreter exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_FAILED
    except Exception as err:  # the CLI promises: never a traceback
        if os.environ.get("SCISTREAMCTL_DEBUG"):
            import traceback

            traceback.print_exc()
        return _report(
            CtlError(
                f"internal error ({type(err).__name__}: {_one_line(str(err))}): please report "
                "it with the command you ran; set SCISTREAMCTL_DEBUG=1 for details",
                EXIT_FAILED,
                "InternalError",
            ),
            as_json,
        )


def run() -> None:
    """main() as the command: exit with its code, skipping the interpreter's teardown.

    Tearing down the modules of remote mode (ssl, http.client, threads; when it
    used requests and urllib3, ~40 ms of a ~300 ms ``tunnel``) is work nobody
    needs: output is flushed here, sockets and files close with the process, and
    scistreamctl registers no exit handlers (argcomplete exits the same way).
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # e.g. the reader went away (| head)
            code = code or EXIT_FAILED
    os._exit(code)
