#!/usr/bin/env bash
# Run here (a machine with a package index) before a GPU run on a host that has none: collects what such a
# host lacks as wheels for its Python, in two folders small enough for one transfer each.
#   .whl/         hydra-core, omegaconf, mlflow, tritonclient and the dependencies a CUDA image lacks (~43 MB)
#   .whl-triton/  the nvidia-pytriton wheel, which holds the tritonserver binary (~55 MB; never pip-installed)
# Usage: scripts/gpu_wheels.sh [PYTHON_VERSION (3.12)] [HAVE_FILE]
#   HAVE_FILE: package names already on the GPU host, one per line or space-separated (`pip list` of that
#   host): those are not carried. Default: scripts/gpu_host_packages.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
have=${2:-scripts/gpu_host_packages.txt}
platforms=(--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 --platform any)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 pins) is published as a source archive only: build it here.
python3 -m pip wheel -q --no-deps -w "$tmp" "antlr4-python3-runtime==4.9.3"
python3 -m pip download -q --only-binary=:all: --python-version "$py" --implementation cp "${platforms[@]}" \
  -f "$tmp" -d "$tmp" "mlflow>=3.1,<4" "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" "tritonclient[http,grpc]>=2.50,<3"
rm -rf .whl .whl-triton && mkdir -p .whl .whl-triton
python3 - "$tmp" "$have" <<'PY'
import re, shutil, sys
from pathlib import Path
src, have_file = Path(sys.argv[1]), Path(sys.argv[2])
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
lines = have_file.read_text().splitlines() if have_file.is_file() else []
have = {norm(n) for line in lines if not line.startswith("#") for n in line.split()}
kept = 0
for wheel in sorted(src.glob("*.whl")):
    if norm(wheel.name.split("-")[0]) not in have:
        shutil.copy2(wheel, ".whl")
        kept += wheel.stat().st_size
print(f".whl: {kept / 1e6:.1f} MB")
PY
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" "${platforms[@]}" \
  -d .whl-triton "$(python3 -c 'import yaml,sys; print(yaml.safe_load(open("conf/serving/default.yaml"))["wheel"])' 2>/dev/null || echo nvidia-pytriton==0.7.0)"
du -sh .whl .whl-triton
rm -rf .gpu-carry && mkdir -p .gpu-carry "$tmp/site"
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version "$py" --implementation cp \
  "${platforms[@]}" --target "$tmp/site" .whl/*.whl
tar -C "$tmp/site" -cf - . | xz -9 > .gpu-carry/site.tar.xz
# The server wheel with only what `pipeline.serving install` unpacks for this Python, stored uncompressed (xz
# compresses it better than zip's deflate).
wheel=$(ls .whl-triton/nvidia_pytriton-*.whl)
python3 - "$wheel" "$tmp/$(basename "$wheel")" "$py" <<'PY'
import sys, zipfile
src, dst, py = sys.argv[1:]
stubs = "pytriton/tritonserver/python_backend_stubs/"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
    for info in zin.infolist():
        name = info.filename
        if (name.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")) and not info.is_dir()
                and (not name.startswith(stubs) or name.startswith(f"{stubs}{py}/"))
                and not name.startswith("nvidia_pytriton.libs/libpython3")):  # the stubs link the host's libpython
            kept = zipfile.ZipInfo(name, info.date_time)
            kept.external_attr = info.external_attr  # the mode bits (the server's executable)
            zout.writestr(kept, zin.read(info))
PY
xz -9 -c "$tmp/$(basename "$wheel")" > ".gpu-carry/$(basename "$wheel").xz"
du -sh .gpu-carry/*
