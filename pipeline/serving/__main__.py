"""python -m pipeline.serving {install,start,stop,status} [key=value ...]: the local Triton server."""
import argparse
import json

from pipeline.serving.config import load_config, main_guard
from pipeline.serving.rollout import start_on_last_good
from pipeline.serving.server import LocalServer, TritonInstall, install


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.serving", description=__doc__)
    parser.add_argument("command", choices=("install", "start", "stop", "status"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. serving.http_port=8010")
    parser.add_argument("--wheel-file", default=None,
                        help="install: unpack this nvidia-pytriton wheel instead of downloading serving.wheel")
    args = parser.parse_args()
    scfg = load_config(args.overrides).serving
    server = LocalServer(scfg)
    if args.command == "install":
        install(scfg.triton_dir, scfg.wheel, args.wheel_file)
    elif args.command == "start":
        if server.is_live():
            print(f"a server already answers on {server.url}")
            return 0
        start_on_last_good(server)
    elif args.command == "stop":
        if not server.stop():
            print(f"no server started from {server.root} is running")
    else:
        TritonInstall.find(scfg.triton_dir)
        print(json.dumps({"live": server.is_live(), "pid": server.pid(), "url": server.url,
                          "grpc_url": server.grpc_url, "metrics_url": server.metrics_url,
                          "repository": str(server.repository), "log": str(server.log_file)}, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
