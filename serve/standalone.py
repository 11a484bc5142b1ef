"""The same API without Ray: one process, preprocessing and model in-process, run by uvicorn.

The baseline of bench/serve.py (Serve's hops and dynamic batching vs none), and a way to serve a
bundle where Ray is not wanted:

    python -m serve.standalone --bundle runs/demo/model --port 8001

Routes and validation are serve/routes.py's, shared with the Ray Serve ingress.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fastapi import FastAPI

from raytr.config import ServeConfig
from raytr.errors import user_error_message
from serve.engine import LocalBackend
from serve.routes import build_app, resolve_admin_token

log = logging.getLogger(__name__)


def build_standalone_app(bundle_dir: str, config: ServeConfig | None = None, device: str = "cpu") -> FastAPI:
    """The FastAPI app of one bundle, served from this process."""
    config = config or ServeConfig(model_dir=bundle_dir)
    backend = LocalBackend(bundle_dir, config, device)
    return build_app(backend, backend.data, config, resolve_admin_token(config), title="raytr (standalone)")


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m serve.standalone", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="a `raytr train` output directory (model bundle)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--admin-token-file", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServeConfig(model_dir=args.bundle, host=args.host, port=args.port,
                             admin_token_file=args.admin_token_file)
        app = build_standalone_app(args.bundle, config, args.device)
    except Exception as exc:  # a missing bundle or token file: one line, as `raytr` prints it
        message = user_error_message(exc)
        if message is None:
            raise
        print(f"serve.standalone: error: {message}", file=sys.stderr)
        return 2
    log.info("standalone server for %s at http://%s:%d", args.bundle, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
