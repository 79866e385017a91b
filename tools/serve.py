"""`make serve`: the host with the pack in the foreground on PORT, for the graph editor in a browser."""
from __future__ import annotations

import argparse
import os
import sys

from tools import hostenv, standins
from tools.hostenv import HostError


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8188)))
    args = ap.parse_args()
    try:
        srv = hostenv.Server(port=args.port, standin_dir=standins.ensure(("sd15",)),
                             output_dir=hostenv.REPO / "out" / "serve")
    except HostError as e:
        print(f"make serve: {e}", file=sys.stderr)
        return 2
    print(f"fewstep: ComfyUI on http://127.0.0.1:{srv.port} (Ctrl-C stops it)", flush=True)
    os.chdir(hostenv.host_dir())
    os.execv(sys.executable, srv.cmd)


if __name__ == "__main__":
    sys.exit(main())
