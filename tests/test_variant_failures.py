"""A variant that fails to build or load is recorded as failed and the run goes on without it; an AOTInductor
package that crashes its loader is rebuilt with the system's C++ compiler."""
import csv
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf

from conftest import run_pipeline, seed_store
from pipeline.core import ConfigError, Manifest, PipelineError, build_variant, failure_reason
from pipeline.export import inductor
from pipeline.tracking import Tracker


@pytest.mark.slow
def test_a_variant_that_fails_to_build_leaves_the_run_going(tiny_args, tmp_path):
    env_cxx = os.environ.get("CXX")
    os.environ["CXX"] = "/bin/false"  # no C++ compiler: the Inductor variants cannot build, the others can
    try:
        proc = run_pipeline(["stage=all", "precision=fp32", "compile.aoti.devices=[cpu]", *tiny_args], cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (run_dir,) = (tmp_path / "artifacts" / "runs").iterdir()
        manifest = Manifest.load(run_dir / "manifest.json")
        assert "InvalidCxxCompiler" in manifest.stages["compile"]["failures"]["aoti-fp32"]
        assert "aoti-fp32" not in {v.name for v in manifest.variants()}
        # precision=fp32: the onnx stage exports the fp32 model alone; trt is skipped here and makes nothing
        assert [v["name"] for v in manifest.stages["onnx"]["variants"]] == ["onnxruntime-fp32"]
        assert manifest.stages["trt"]["status"] == "skipped" and not manifest.stages["trt"]["variants"]

        # validate: a row with gate_passed false and the reason, in the table and the results promote reads
        with open(run_dir / "validate_variants.csv") as f:
            rows = {r["variant"]: r for r in csv.DictReader(f)}
        assert float(rows["aoti-fp32"]["gate_passed"]) == 0.0
        assert rows["aoti-fp32"]["gate_reason"].startswith("failed in compile: PipelineError: AOTInductor could not")
        assert float(rows["onnxruntime-fp32"]["gate_passed"]) == 1.0
        assert "| aoti-fp32 |" in (run_dir / "validate_variants.md").read_text()
        results = {r["variant"]["name"]: r for r in json.loads((run_dir / "validate_variants.json").read_text())}
        assert results["aoti-fp32"]["gate_passed"] is False and results["aoti-fp32"]["failed"]
        champion = json.loads((run_dir / "champion.json").read_text())
        assert champion["variant"]["name"] in {"eager-fp32", "onnxruntime-fp32"}

        # MLflow: a FAILED variant run under the compile stage's run, which names it in failed_variants
        client = MlflowClient(f"sqlite:///{tmp_path / 'artifacts' / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("genrec").experiment_id])
        by_name = {r.info.run_name: r for r in runs}
        failed = by_name["variant:aoti-fp32"]
        assert failed.info.status == "FAILED" and failed.data.tags["status"] == "failed"
        assert failed.data.tags["stage"] == "compile" and "InvalidCxxCompiler" in failed.data.tags["reason"]
        assert failed.data.tags["mlflow.parentRunId"] == by_name["compile"].info.run_id
        assert "aoti-fp32: " in by_name["compile"].data.tags["failed_variants"]

        # A variant that fails to load in validate is a row too; strict=true makes that exit 1 after the stage ran.
        onnx_fp32 = next(v for v in manifest.variants() if v.name == "onnxruntime-fp32")
        Path(onnx_fp32.artifact).unlink()
        again = run_pipeline(["stage=validate", f"from_run={run_dir.name}", "strict=true", *tiny_args], cwd=tmp_path)
        output = again.stdout + again.stderr
        assert again.returncode == 1, output
        assert "strict=true: exit 1" in output and "onnxruntime-fp32" in output
        (rerun,) = [d for d in (tmp_path / "artifacts" / "runs").iterdir() if d != run_dir]
        with open(rerun / "validate_variants.csv") as f:
            rows = {r["variant"]: r for r in csv.DictReader(f)}
        assert rows["onnxruntime-fp32"]["gate_reason"].startswith("failed in validate: ")
        assert rows["aoti-fp32"]["gate_reason"].startswith("failed in compile: ")  # from the earlier run's manifest
        assert float(rows["eager-fp32"]["gate_passed"]) == 1.0
    finally:
        if env_cxx is None:
            os.environ.pop("CXX", None)
        else:
            os.environ["CXX"] = env_cxx


@pytest.fixture
def ctx(tmp_path, store_template):
    seed_store(store_template, tmp_path)
    cfg = OmegaConf.create({"tracking_uri": None, "experiment_name": "genrec"})
    tracker = Tracker(cfg, tmp_path)
    with tracker.run("pipeline", nested=False), tracker.run("compile", tags={"stage": "compile"}):
        yield SimpleNamespace(tracker=tracker)


def test_build_variant_records_the_failure_and_goes_on(ctx):
    failures = {}

    def broken():
        raise RuntimeError("the loader said no\nand a long story after it")

    assert build_variant(ctx, "aoti-fp16", failures, broken) is None
    assert build_variant(ctx, "inductor-fp16", failures, lambda: "built") == "built"
    assert failures == {"aoti-fp16": "RuntimeError: the loader said no"}
    client = ctx.tracker.client
    (run,) = client.search_runs([ctx.tracker.experiment_id], "attributes.run_name = 'variant:aoti-fp16'")
    assert run.info.status == "FAILED"
    assert run.data.tags["status"] == "failed" and run.data.tags["reason"] == "RuntimeError: the loader said no"
    assert run.data.tags["stage"] == "compile"
    assert ctx.tracker.mlflow.active_run().info.run_name == "compile"  # the stage's run is still the active one


def test_build_variant_lets_config_errors_stop_the_stage(ctx):
    def misconfigured():
        raise ConfigError("unknown torch.compile mode 'fastest'")

    with pytest.raises(ConfigError, match="fastest"):
        build_variant(ctx, "inductor-fastest-fp32", {}, misconfigured)


def test_failure_reason_is_short():
    assert failure_reason(PipelineError("x" * 1000)).endswith("...") and len(failure_reason(PipelineError("x" * 1000))) == 300
    assert failure_reason(ValueError()) == "ValueError"


def test_system_cxx_skips_the_compiler_that_crashed(tmp_path):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++ here")
    wrapper = tmp_path / "g++"
    wrapper.symlink_to(gxx)
    assert inductor.system_cxx(exclude=str(tmp_path / "cxx-wrapper")) in ("/usr/bin/g++", os.path.realpath(gxx))
    # a link to the system compiler is that compiler: another one or none
    chosen = inductor.system_cxx(exclude=str(wrapper))
    assert chosen is None or os.path.realpath(chosen) != os.path.realpath(gxx)


def _crash(signal_name="SIGSEGV"):
    return inductor.PackageCrash(f"the package does not load (the process was killed by {signal_name})", signal_name)


def test_a_crashing_package_is_rebuilt_once_with_the_system_compiler(tmp_path, monkeypatch, caplog):
    builds, probes = [], []
    record = tmp_path / "cache" / "cxx.json"
    monkeypatch.setattr(inductor, "_cxx_record_path", lambda: record)
    monkeypatch.setattr(inductor, "_probe_toolchain", lambda used, work: used)  # the probe passed, the package crashed
    monkeypatch.setattr(inductor, "system_cxx", lambda exclude: "/usr/bin/g++" if exclude != "/usr/bin/g++" else None)
    monkeypatch.setenv("CXX", "/opt/toolchain/bin/g++-wrapper")
    wrapper = torch._inductor.config.patch({"cpp.cxx": (None, "/opt/toolchain/bin/g++-wrapper")})

    def compile_package(program, path, configs=None):
        builds.append({"configs": configs, "CXX": os.environ.get("CXX"),
                       "cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")})
        return path

    def probe(package, device):
        probes.append(package)
        if len(probes) == 1:
            raise _crash()

    monkeypatch.setattr(inductor, "_compile_package", compile_package)
    monkeypatch.setattr(inductor, "_probe_load", probe)
    with caplog.at_level("WARNING", logger="pipeline.export.inductor"), wrapper:
        package = inductor.package_program("program", tmp_path / "p.pt2", torch.device("cpu"))
    assert package.cxx == "/usr/bin/g++" and len(builds) == 2 and len(probes) == 2
    first, rebuild = builds
    assert first["configs"] is None and first["CXX"] == "/opt/toolchain/bin/g++-wrapper"
    assert rebuild["configs"] == {"cpp.cxx": (None, "/usr/bin/g++")} and rebuild["CXX"] == "/usr/bin/g++"
    assert rebuild["cache"] != first["cache"]  # a fresh Inductor cache: the crashed build is not served again
    assert os.environ["CXX"] == "/opt/toolchain/bin/g++-wrapper"
    assert "crashed its loader with CXX=/opt/toolchain/bin/g++-wrapper; rebuilt with /usr/bin/g++" in caplog.text

    # the host remembers: the next package is built with the system compiler at once, in a fresh cache
    assert record.is_file()
    monkeypatch.setattr(inductor.shutil, "which", lambda name: name if name == "/usr/bin/g++" else None)
    builds.clear()
    probes.clear()
    monkeypatch.setattr(inductor, "_probe_load", lambda package, device: probes.append(package))
    with caplog.at_level("INFO", logger="pipeline.export.inductor"), wrapper:
        package = inductor.package_program("program", tmp_path / "q.pt2", torch.device("cpu"))
    assert package.cxx == "/usr/bin/g++" and len(builds) == 1 and len(probes) == 1
    assert builds[0]["configs"] == {"cpp.cxx": (None, "/usr/bin/g++")} and builds[0]["CXX"] == "/usr/bin/g++"
    assert builds[0]["cache"] != first["cache"]
    assert "builds AOTInductor packages that crash their loader on this host" in caplog.text

    # if the remembered compiler's package crashes too, that is the variant's failure, and the record goes
    monkeypatch.setattr(inductor, "_probe_load", lambda package, device: (_ for _ in ()).throw(_crash()))
    with pytest.raises(inductor.PackageCrash, match="which had replaced CXX=/opt/toolchain/bin/g\\+\\+-wrapper"), \
            wrapper:
        inductor.package_program("program", tmp_path / "q.pt2", torch.device("cpu"))
    assert inductor._known_replacement("/opt/toolchain/bin/g++-wrapper") is None
    monkeypatch.undo()
    monkeypatch.setattr(inductor, "_cxx_record_path", lambda: record)
    monkeypatch.setattr(inductor, "_probe_toolchain", lambda used, work: used)
    monkeypatch.setattr(inductor, "system_cxx", lambda exclude: "/usr/bin/g++" if exclude != "/usr/bin/g++" else None)
    monkeypatch.setattr(inductor, "_compile_package", compile_package)

    # a crash of the rebuilt package too is the variant's failure, naming both compilers
    probes.clear()
    monkeypatch.setattr(inductor, "_probe_load", lambda package, device: (_ for _ in ()).throw(_crash()))
    with pytest.raises(inductor.PackageCrash, match="rebuilt with /usr/bin/g\\+\\+ after it crashed with CXX="), wrapper:
        inductor.package_program("program", tmp_path / "p.pt2", torch.device("cpu"))

    # with no other compiler there is nothing to rebuild with: the crash as it was
    with pytest.raises(inductor.PackageCrash, match="killed by SIGSEGV") as err, \
            torch._inductor.config.patch({"cpp.cxx": (None, "/usr/bin/g++")}):
        inductor.package_program("program", tmp_path / "p.pt2", torch.device("cpu"))
    assert "rebuilt" not in str(err.value)


def test_a_probe_package_finds_a_crashing_toolchain_before_the_real_build(tmp_path, monkeypatch):
    """On a host with a second compiler, the first package is preceded by a one-layer probe package built with
    the configured compiler: if it crashes its loader, the real package is built once, with the system
    compiler; if it loads, the real build uses the configured one. Either verdict is recorded: no probe
    for the next package."""
    record = tmp_path / "cache" / "cxx.json"
    monkeypatch.setattr(inductor, "_cxx_record_path", lambda: record)
    monkeypatch.setattr(inductor, "system_cxx", lambda exclude: "/usr/bin/g++" if exclude != "/usr/bin/g++" else None)
    monkeypatch.setattr(inductor.shutil, "which", lambda name: name)
    builds = []

    def compile_package(program, path, configs=None):
        builds.append((Path(path).name, (configs or {}).get("cpp.cxx"), os.environ.get("CXX")))
        return Path(path)

    monkeypatch.setattr(inductor, "_compile_package", compile_package)
    crashing = {"/opt/bad/g++"}

    def probe(package, device):
        if os.environ.get("CXX") in crashing or (package.name.startswith(".cxx-probe") and current[0] in crashing):
            raise _crash()

    current = ["/opt/bad/g++"]
    monkeypatch.setattr(inductor, "_probe_load", probe)
    with torch._inductor.config.patch({"cpp.cxx": (None, "/opt/bad/g++")}):
        package = inductor.package_program("program", tmp_path / "p.pt2", torch.device("cpu"))
        assert package.cxx == "/usr/bin/g++"
        assert [b[0] for b in builds] == [builds[0][0], "p.pt2"] and builds[0][0].startswith(".cxx-probe")
        assert builds[1][1:] == ((None, "/usr/bin/g++"), "/usr/bin/g++")  # the real package: built once
        builds.clear()
        inductor.package_program("program", tmp_path / "q.pt2", torch.device("cpu"))
        assert [b[0] for b in builds] == ["q.pt2"]  # remembered: no probe
    current[0] = "/opt/good/g++"
    builds.clear()
    with torch._inductor.config.patch({"cpp.cxx": (None, "/opt/good/g++")}):
        package = inductor.package_program("program", tmp_path / "r.pt2", torch.device("cpu"))
        assert package.cxx == "/opt/good/g++" and builds[-1] == ("r.pt2", None, None) and len(builds) == 2
        builds.clear()
        inductor.package_program("program", tmp_path / "s.pt2", torch.device("cpu"))
        assert builds == [("s.pt2", None, None)]
    assert not list(tmp_path.glob(".cxx-probe*"))


CRASH_ON_LOAD = """
#include <signal.h>
__attribute__((constructor)) static void crash_on_load() { raise(SIGSEGV); }
"""


@pytest.mark.slow
def test_a_toolchain_whose_packages_crash_is_replaced_by_the_system_compiler(tmp_path, monkeypatch):
    """A real C++ compiler wrapper whose shared libraries kill the process that loads them: the package is
    rebuilt with the system g++ (not served from Inductor's cache) and loads."""
    if not Path("/usr/bin/g++").exists():
        pytest.skip("no /usr/bin/g++ here")
    subprocess.run(["/usr/bin/g++", "-fPIC", "-c", "-x", "c++", "-", "-o", str(tmp_path / "crash.o")],
                   input=CRASH_ON_LOAD, text=True, check=True)
    wrapper = tmp_path / "cxx-wrapper"
    calls = tmp_path / "calls.log"
    wrapper.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
case " $* " in *" -shared "*) exec /usr/bin/g++ "$@" {tmp_path / 'crash.o'} ;; esac
exec /usr/bin/g++ "$@"
""")
    wrapper.chmod(0o755)
    model = torch.nn.Linear(4, 3).eval()
    program = torch.export.export(model, (torch.randn(2, 4),))
    # a fresh cache so that the wrapper really builds the first package
    with inductor._fresh_inductor_cache(), torch._inductor.config.patch({"cpp.cxx": (None, str(wrapper))}):
        package = inductor.package_program(program, tmp_path / "linear.pt2", torch.device("cpu"))
        assert " -shared " in calls.read_text()  # the wrapper built (and broke) the probe package
        # remembered on this host: the next package skips the probe and is built by the system compiler alone
        assert inductor._known_replacement(str(wrapper)) == "/usr/bin/g++"
        calls.write_text("")
        again = inductor.package_program(program, tmp_path / "again.pt2", torch.device("cpu"))
    assert package.cxx == "/usr/bin/g++" and again.cxx == "/usr/bin/g++"
    assert " -shared " not in calls.read_text()
    loaded = torch._inductor.aoti_load_package(str(package.path))
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded(x), model(x))
