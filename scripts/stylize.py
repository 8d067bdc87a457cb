#!/usr/bin/env python3
"""Stylize CONTENT with STYLE, through the server (default) or in-process (--local).

  stylize.py content.jpg style.jpg -o out.png --steps 300
  stylize.py content.jpg style.jpg -o out.png --local --weights weights/vgg19_features.pth

Every request parameter of the API is an option (--steps, --max-size,
--preset, --seed, ...); both modes validate them with the same parser.
Server mode streams progress (stream=true): a progress bar when stdout is a
terminal, a plain line per record otherwise (on stderr), nothing with
--quiet. The token is read from TorchServe's key_file.json unless --token is
given. A failure is one line on stderr and exit status 1 (2 for a bad
command line), never a traceback.
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "handler"))
from manage import MODEL  # noqa: E402
from nst.request import PARSERS  # noqa: E402
from nst.weights import FILE_NAME as WEIGHTS_FILE  # noqa: E402


def _progress(step: int, steps: int, loss: float, elapsed_ms: float) -> None:
    print(f"step {step}/{steps}  loss {loss:.4g}  {elapsed_ms / 1e3:.1f}s", file=sys.stderr, flush=True)


class _Bar:
    """The stream's progress as a tqdm bar on the terminal (stdout)."""

    def __init__(self):
        import os

        from tqdm import tqdm

        try:
            size = os.get_terminal_size(sys.stdout.fileno())
        except OSError:
            size = os.terminal_size((0, 0))
        # A terminal that reports no size (a bare pseudo-terminal) would get an
        # empty bar, and tqdm hides a bar below the screen's last row.
        known = size.columns > 0 and size.lines > 0
        self.bar = tqdm(total=None, unit="step", file=sys.stdout, dynamic_ncols=known,
                        ncols=None if known else 80, nrows=None if known else 24)

    def __call__(self, step: int, steps: int, loss: float, elapsed_ms: float) -> None:
        if self.bar.total != steps:
            self.bar.total = steps
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.4g}")

    def close(self) -> None:
        self.bar.close()


def progress_display(quiet: bool):
    """(callback, close): a bar on a terminal, plain lines otherwise, nothing when quiet."""
    if quiet:
        return (lambda *a: None), (lambda: None)
    if sys.stdout.isatty():
        bar = _Bar()
        return bar, bar.close
    return _progress, (lambda: None)


SUFFIX_FORMAT = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def _is_bool(name: str) -> bool:
    """Whether request parameter `name` is a boolean (its parser reads true and false)."""
    from nst import Limits

    try:
        return {PARSERS[name]("true", Limits()), PARSERS[name]("false", Limits())} == {True, False}
    except Exception:  # noqa: BLE001  any refusal: not a boolean
        return False


class Failed(Exception):
    """What went wrong, said in one line."""


def run_server(args, content: bytes, styles: list[bytes], given: dict[str, str]) -> int:
    import requests

    from manage import KeyFileError, addresses, default_config, read_key  # scripts/ is this script's own directory

    if args.server is None:  # the server this checkout's config.properties sets up, as manage.py reaches it
        args.server = addresses(default_config())["inference"]
    try:
        token = args.token or read_key(args.key_file, "inference")
    except KeyFileError as e:
        raise Failed(f"{e}, or --token") from None
    try:
        return _call_server(args, token, content, styles, given)
    except requests.Timeout:
        raise Failed(f"no answer from {args.server} within --timeout {args.timeout:g} s") from None
    except requests.RequestException as e:
        raise Failed(f"the connection to {args.server} failed ({type(e).__name__}): is TorchServe running "
                     "there (make serve)?") from None


def _record(line: bytes) -> dict:
    """One NDJSON record of the stream, or Failed where it is none (a proxy's
    page, an image where a stream was asked for)."""
    try:
        record = json.loads(line)
    except ValueError:  # UnicodeDecodeError included
        raise Failed(f"the answer is not the NDJSON stream asked for: {line[:120]!r}") from None
    if not isinstance(record, dict):
        raise Failed(f"the answer is not the NDJSON stream asked for: {line[:120]!r}")
    return record


def _error_line(code: object, message: object, request_id: str | None) -> str:
    """One line for stderr: the code, the server's message (its JSON error's
    `message`, else the answer's text) and TorchServe's request id, which
    the model log names the request by."""
    text = " ".join(str(message).split())[:500] or "(an empty answer)"
    return f"error {code}: {text}" + (f" (request {request_id})" if request_id else "")


def _call_server(args, token: str, content: bytes, styles: list[bytes], given: dict[str, str]) -> int:
    import requests

    from manage import error_message, http

    files = {"content": ("content", content), "style": ("style", styles[0])}
    for i, data in enumerate(styles[1:], start=2):
        files[f"style_{i}"] = (f"style_{i}", data)
    fields = dict(given, stream="true")
    t0 = time.monotonic()
    with http(
        "POST", f"{args.server}/predictions/{MODEL}",
        files=files,
        data=fields,
        headers={"Authorization": f"Bearer {token}"},
        stream=True,
        timeout=(10, args.timeout),
    ) as r:
        request_id = r.headers.get("x-request-id")
        if r.headers.get("Content-Type", "").startswith("application/json") or not r.ok:
            print(_error_line(r.status_code, error_message(r.text), request_id), file=sys.stderr)
            return 1
        final, last = None, None
        show, close = progress_display(args.quiet)
        try:
            for line in r.iter_lines():
                if not line:
                    continue
                record = _record(line)
                if record.get("done"):
                    final = record
                elif "step" in record:
                    show(record["step"], record["steps"], record["loss"], record["elapsed_ms"])
                    last = record
                else:  # TorchServe's own error after the stream began, e.g. {"code": 500, "message": "Worker died."}
                    final = {"error": {"code": record.get("code", "?"), "message": record.get("message", record)}}
                    break
        except requests.RequestException as e:
            # The server was reached and the run had started: a cut stream is
            # a worker that died (or a server that stopped), not a server
            # that is not running.
            where = f"after step {last['step']} of {last['steps']}" if last else "before its first record"
            raise Failed(f"the stream broke off {where} ({type(e).__name__}): the worker died or the server "
                         "stopped" + (f" (request {request_id})" if request_id else "")) from None
        finally:
            close()
    if final is None:
        print("error: the stream ended without a result" + (f" (request {request_id})" if request_id else ""),
              file=sys.stderr)
        return 1
    if "error" in final:
        print(_error_line(final["error"]["code"], final["error"]["message"], request_id), file=sys.stderr)
        return 1
    Path(args.output).write_bytes(base64.b64decode(final["image"]))
    if not args.quiet:
        print(
            f"wrote {args.output}: {final['steps']} steps, loss {final['loss']:.4g}, "
            f"{final['elapsed_ms'] / 1e3:.1f}s optimizing, {time.monotonic() - t0:.1f}s total, "
            f"weights {final['weights']}",
            file=sys.stderr,
        )
    return 0


def run_local(args, content: bytes, styles: list[bytes], given: dict[str, str]) -> int:
    import torch

    from nst import Limits, RequestError, VGGFeatures, parse_request, run
    from nst import weights as nst_weights
    from nst.optimize import BudgetExceeded, Diverged

    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)  # a device this machine has
    except (RuntimeError, AssertionError) as e:
        raise Failed(f"--device {args.device}: {str(e).splitlines()[0][:120]}") from None
    limits = Limits().for_device(device.type)
    fields = {"content": content, "style": styles[0], **given}
    fields.update({f"style_{i}": s for i, s in enumerate(styles[1:], start=2)})
    try:
        request = parse_request(fields, limits)  # before loading weights: fail fast
        try:
            state, kind = nst_weights.load(args.weights)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise Failed(f"cannot load the weights {args.weights} ({type(e).__name__}: {str(e)[:120]}); "
                         "make weights writes them") from None
        vgg = VGGFeatures(state).to(device)
        show, close = progress_display(args.quiet)
        try:
            out = run(request, vgg, limits, callback=lambda p: show(p.step, p.steps, p.loss, p.elapsed_ms))
        finally:
            close()
    except RequestError as e:
        print(f"error {e.code}: {e.message}", file=sys.stderr)
        return 1
    except (BudgetExceeded, Diverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    Path(args.output).write_bytes(out.data)
    r = out.result
    if not args.quiet:
        print(f"wrote {args.output}: {r.steps} steps, loss {r.loss:.4g}, {r.elapsed_ms / 1e3:.1f}s, weights {kind}",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("content")
    ap.add_argument("style")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--extra-style", action="append", default=[], metavar="FILE",
                    help="another style image (style_2, style_3, ... in order); repeatable")
    ap.add_argument("--server", default=None,
                    help="inference address (default: ./config.properties' where there is one, else "
                         "http://127.0.0.1:8080)")
    ap.add_argument("--key-file", default="key_file.json", help="TorchServe's key file (for the token)")
    ap.add_argument("--token", help="inference key, instead of reading --key-file")
    ap.add_argument("--timeout", type=float, default=900.0, help="read timeout, s")
    ap.add_argument("--local", action="store_true", help="run in-process instead of calling the server")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary; errors still go to stderr")
    ap.add_argument("--weights", default=str(ROOT / "weights" / WEIGHTS_FILE), help="--local: weights file")
    ap.add_argument("--device", default="cpu", help="--local: cpu or cuda")
    for name in PARSERS:
        if name == "stream":
            continue  # server mode always streams, to show progress
        flag = _is_bool(name)  # --preserve-color alone means true
        ap.add_argument(f"--{name.replace('_', '-')}", dest=f"param_{name}", metavar="VALUE",
                        nargs="?" if flag else None, const="true" if flag else None,
                        help=f"request parameter `{name}` (see the API contract)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    given = {k[len("param_"):]: v for k, v in vars(args).items() if k.startswith("param_") and v is not None}
    # The output's extension names its format unless --format does; both, disagreeing, is a mistake.
    implied = SUFFIX_FORMAT.get(Path(args.output).suffix.lower())
    if implied and "format" not in given:
        given["format"] = implied
    elif implied and given["format"].strip().lower() != implied:
        ap.error(f"-o {args.output} names {implied}, --format {given['format']}")
    # Before any work: a result with nowhere to go would be lost after the run.
    if not Path(args.output).resolve().parent.is_dir():
        ap.error(f"-o {args.output}: no directory {Path(args.output).parent}")
    try:
        content = Path(args.content).read_bytes()
        styles = [Path(p).read_bytes() for p in [args.style, *args.extra_style]]
    except OSError as e:
        ap.error(f"{e.filename}: {e.strerror}")
    try:
        if args.local:
            return run_local(args, content, styles, given)
        return run_server(args, content, styles, given)
    except Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
