"""bench/mask_throughput.py as a user runs it: a tiny smoke run whose JSON holds every CPU provider, its ratios and
passed checks. No timing is asserted (timings on shared machines are noise; the benchmark reports, never gates)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT

SCRIPT = ROOT / "bench" / "mask_throughput.py"


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_run_writes_every_cpu_provider_with_ratios_and_passed_checks(kjv_corpus, tmp_path):
    # kjv_corpus builds the token cache in this session's GENESIS_CACHE, which the subprocess inherits
    out = tmp_path / "bench.json"
    proc = run_bench("--sizes", "2x64", "--repeats", "2", "--quick", "--json", str(out))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(out.read_text())

    checks = report["checks"]
    assert checks["passed"] is True
    assert checks["kernel_equals_torch"]["status"] in ("passed", "skipped")
    assert all(r["passed"] and r["trials"] > 0 for r in checks["rates"])
    assert {(r["provider"], r["strategy"]) for r in checks["rates"]} >= {
        ("loop", "weighted"), ("loop", "structural"), ("torch-cpu", "weighted"), ("torch-cpu", "structural")}

    rows = report["results"]
    hf = any(r["provider"] == "hf-collator" for r in rows)
    providers = ["loop", "torch-cpu"] + (["hf-collator"] if hf else [])
    if not hf:
        assert any("transformers" in note for note in report["notes"])
    for strategy in ("weighted", "structural"):
        for provider in providers:
            (row,) = [r for r in rows if r["provider"] == provider and r["strategy"] == strategy]
            assert row["size"] == "2x64" and row["tokens"] == 128 and row["repeats"] >= 2
            assert row["ms_p10"] <= row["ms_median"] <= row["ms_p90"]
            assert row["tokens_per_s"] > 0 and row["ratio_to_loop"] > 0
            assert (row["ratio_to_hf"] or 0) > 0 or not hf
        loop = next(r for r in rows if r["provider"] == "loop" and r["strategy"] == strategy)
        assert loop["ratio_to_loop"] == 1.0

    share = report["step_share"]
    assert share["config"] == "cpu.toml" and share["step_ms_masking_on"]["median"] > 0
    assert share["step"] == "genesis.train.train_step" and share["impl"] == "torch"
    assert report["machine"]["threads"] == 1 and "command" in report["machine"]
    assert {t["target"] for t in report["targets"] if t["note"].startswith("not measured")}  # no GPU, no 64x1024


def test_bad_arguments_fail_with_a_message():
    proc = run_bench("--sizes", "64by1024", timeout=60)
    assert proc.returncode == 2 and "expected BxT" in proc.stderr
    proc = run_bench("--strategies", "random", timeout=60)
    assert proc.returncode == 2 and "unknown" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads: must be >= 1 (got 0)"),
    (["--repeats", "0"], "--repeats: must be >= 1"),
    (["--batches", "0"], "--batches: must be >= 1"),
    (["--warmup", "0"], "--warmup: must be >= 1"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--min-repeats", "0"], "--min-repeats: must be >= 1"),
    (["--budget", "-1"], "--budget: must be >= 0 seconds"),
    (["--sizes", ","], "--sizes: no size given"),
    (["--sizes", "0x5"], "--sizes: size '0x5'"),
    (["--kernel-windows", "300"], "--kernel-windows: each value must be a power of two"),
    (["--kernel-blocks", "abc"], "--kernel-blocks: expected a comma list of integers"),
    (["--step-share", "nosuch.toml"], "--step-share: nosuch.toml: config not found"),
    (["--json", "/proc/nosuch/out.json"], "--json /proc/nosuch/out.json: cannot create its directory"),
])
def test_bad_options_fail_before_any_work(argv, message, capsys):
    """Every option is checked when parsed, not after minutes of timing."""
    with pytest.raises(SystemExit) as exit_:
        load_bench().parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def load_bench():
    """The script as a module (bench/ is not a package); registered first, as dataclasses need."""
    import importlib.util

    if "mask_throughput" in sys.modules:
        return sys.modules["mask_throughput"]
    spec = importlib.util.spec_from_file_location("mask_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mask_throughput"] = module
    spec.loader.exec_module(module)
    return module


def test_rate_check_fails_when_masking_differs_from_the_configuration(kjv_corpus):
    bench = load_bench()  # puts the checkout on sys.path, where the bench package lies
    from bench.notes_baselines import NotesUniformDataset
    from bench.rate_checks import Z_MAX, Tally, check_loop

    split, tok = kjv_corpus.splits["train"], kjv_corpus.tokenizer
    work = bench.make_workload(split, 8, 1024, 4, 1, "cpu", "view", False)
    tokens = split.tokens[:].astype("int64").tolist()
    dataset = NotesUniformDataset(tokens, tok, 1024, mask_prob=0.3)
    claimed = NotesUniformDataset(tokens, tok, 1024, mask_prob=0.6)  # what a wrong configuration would say
    provider = bench.loop_provider(dataset, "uniform", work)
    honest, wrong = Tally(), Tally()
    for i, batch in enumerate(work.cpu):
        out = provider.call(i)
        args = (batch.x.numpy(), batch.y.numpy(), batch.verse_start.numpy(), out, tok.get_vocab_size())
        check_loop(dataset, *args, honest)
        check_loop(claimed, *args, wrong)
    assert honest.result("loop", "uniform", "")["passed"]
    assert not wrong.result("loop", "uniform", "")["passed"] and wrong.z < -Z_MAX


def test_hf_check_fails_when_the_collator_keeps_more_than_its_defaults(kjv_corpus):
    """The HF collator's rate checks cover its whole 80/10/10 rule: a collator that never draws random ids
    (random_replace_prob=0, so the last 20% of selected tokens are all kept) passes the selection and [MASK] checks
    and fails the kept-vs-random one."""
    pytest.importorskip("transformers")
    from transformers import DataCollatorForLanguageModeling

    bench = load_bench()
    from bench.rate_checks import Tally, check_hf

    honest, _ = bench.make_hf_collator(kjv_corpus.tokenizer)
    biased = DataCollatorForLanguageModeling(honest.tokenizer, mlm=True, mlm_probability=0.15, mask_replace_prob=0.8,
                                             random_replace_prob=0.0, seed=1, return_tensors="pt")
    work = bench.make_workload(kjv_corpus.splits["train"], 8, 1024, 4, 1, "cpu", "view", True)
    for collator, ok in ((honest, True), (biased, False)):
        tallies = [Tally() for _ in range(3)]
        for i, batch in enumerate(work.cpu):
            check_hf(honest, batch.x, collator(work.hf_rows[i]), *tallies)
        passed = [t.result("hf-collator", "mlm-15%", "")["passed"] for t in tallies]
        assert passed == [True, True, ok], passed


def test_kernel_alone_timing_covers_the_chain_strategy(kjv_corpus):
    """The kernel-alone rows (CUDA only) time every strategy's kernel and structural with causal chains, reusing
    --chain's masker where the run built one. The table is built on any machine; only its timing needs a GPU."""
    from genesis.config import load_config

    bench, cfg, tok = load_bench(), load_config("cpu.toml"), kjv_corpus.tokenizer
    plain = {("triton-cuda", s): bench.make_masker(tok, cfg.masking, s, "triton") for s in ("weighted", "structural")}
    built = bench.kernel_maskers(plain, ["weighted", "structural"], tok, cfg.masking)
    assert list(built) == ["weighted", "structural", "structural+chain"]
    chained = built["structural+chain"].config
    assert (chained.strategy, chained.chain, chained.impl) == ("structural", True, "triton")
    assert not built["structural"].config.chain and built["weighted"] is plain["triton-cuda", "weighted"]
    with_flag = {**plain, ("triton-cuda+chain", "structural"): built["structural+chain"]}
    assert bench.kernel_maskers(with_flag, ["structural"], tok, cfg.masking)["structural+chain"] is \
        built["structural+chain"]
    assert list(bench.kernel_maskers(plain, ["weighted"], tok, cfg.masking)) == ["weighted"]


def test_check_parity_names_the_outputs_that_differ(kjv_corpus):
    """The one comparison the benches run before they time: [] for maskers that agree (the same masker, or the
    torch path on the batch's device against itself on the CPU), the differing outputs otherwise."""
    from genesis.parity import check_parity

    bench = load_bench()
    from bench.workloads import make_masker, with_impl

    cfg, tok = bench.load_config("cpu.toml"), kjv_corpus.tokenizer
    batch = bench.make_workload(kjv_corpus.splits["train"], 4, 256, 1, 1, "cpu", "view", False).cpu[0]
    masker = make_masker(tok, cfg.masking, "structural", "torch")
    assert check_parity(masker, with_impl(masker, "torch"), batch.x, batch.verse_start, step=3, device_b="cpu") == []
    reseeded = with_impl(masker, "torch")
    reseeded.seed = masker.seed + 1
    differences = check_parity(masker, reseeded, batch.x, batch.verse_start, step=3)
    assert differences and differences[0].startswith("input_ids differs at [[")
    assert any(line.startswith("mask differs") for line in differences)
    assert not any(line.startswith("matched") for line in differences)  # the matches do not depend on the seed


def test_profile_times_the_public_layouts_without_touching_the_masking_module(kjv_corpus):
    import genesis.masking as masking

    bench = load_bench()
    from bench.mask_profile import profile_torch_path
    from bench.workloads import make_masker

    before = dict(vars(masking))
    masker = make_masker(kjv_corpus.tokenizer, bench.load_config("cpu.toml").masking, "structural", "torch")
    batch = bench.make_workload(kjv_corpus.splits["train"], 2, 128, 1, 1, "cpu", "view", False).cpu[0]
    prof = profile_torch_path(masker, batch, 2, "cpu")
    assert dict(vars(masking)) == before
    assert [r["layout"] for r in prof["layouts"]] == ["sparse", "dense"] and all(r["ms_median"] > 0
                                                                                  for r in prof["layouts"])
    assert prof["aten"]["op_calls"] > 0 and prof["shape"] == [2, 128] and prof["impl"] == "torch"


def test_step_share_times_the_trainers_own_step(kjv_corpus, monkeypatch):
    """bench/step_share.py calls genesis.train.train_step on a Run from genesis.train.setup, step by step with
    masking off (the run's masker taken out) and on (the configured strategy); the masker is back afterwards."""
    import genesis.train

    load_bench()
    from bench.step_share import step_share

    calls = []
    real = genesis.train.train_step

    def counted(run, step):
        calls.append((run.masker is not None and run.masker.config.strategy, step))
        return real(run, step)

    monkeypatch.setattr(genesis.train, "train_step", counted)
    share = step_share("cpu.toml", "cpu", "weighted", steps=1, warmup=0)
    assert calls == [(False, 0), ("weighted", 0)]
    assert share["step_ms_masking_off"]["n"] == share["step_ms_masking_on"]["n"] == 1
    assert share["masking_ms_per_step"]["median"] > 0 and share["strategy"] == "weighted"


def test_source_hashes_are_taken_when_asked_and_cover_a_package():
    load_bench()
    import bench.common as common

    hashes = common.source_hashes(["genesis.evaluate", "genesis.data", "no_such_module"], [common.__file__])
    assert set(hashes) == {"genesis/evaluate", "genesis/data.py", "bench/common.py"}
    assert all(len(value) == 12 and int(value, 16) >= 0 for value in hashes.values())
    assert not hasattr(load_bench(), "SOURCE_HASHES")  # nothing is hashed at import


@pytest.mark.parametrize("script, argv, message", [
    ("kernel_sweep.py", ["--blocks", "100"], "--blocks: each value must be a power of two"),
    ("kernel_sweep.py", ["--sizes", "4by4"], "--sizes: size '4by4': expected BxT"),
    ("mask_profile.py", ["--calls", "0"], "--calls and --threads must be >= 1"),
    ("step_share.py", ["--config", "nosuch.toml"], "--config: nosuch.toml: config not found"),
])
def test_bench_scripts_refuse_bad_options_with_one_line(script, argv, message):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_kernel_sweep_needs_a_gpu():
    if torch_cuda_available():
        pytest.skip("a GPU is here: the sweep would run")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_sweep.py")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "error: the kernel sweep needs a CUDA GPU" in proc.stderr, proc.stderr


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


TRAIN_SCRIPT = ROOT / "bench" / "train_throughput.py"


def test_train_throughput_smoke_run_compares_genesis_with_transformers(tmp_path):
    """bench/train_throughput.py on the CPU as a user runs it: the Genesis step and transformers' LlamaForCausalLM
    with the same dimensions and weights, checked (same parameter count, same first loss), with tokens/s and MFU."""
    pytest.importorskip("transformers")
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--micro-batches", "2", "--steps", "2", "--warmup", "1",
                           "--threads", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(out.read_text())
    assert report["checks"]["same_model"]["passed"] and report["checks"]["same_start"]["passed"]
    assert report["checks"]["same_model"]["params_genesis"] == report["checks"]["same_model"]["params_hf"]
    rows = {r["mode"]: r for r in report["results"]}
    assert set(rows) == {"genesis-eager", "hf-eager"}
    for row in rows.values():
        assert row["micro_batch"] == 2 and row["tokens"] == 2 * report["model"]["seq_len"]
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["ms_p10"] <= row["ms_median"] <= row["ms_p90"]
    assert rows["genesis-eager"]["vs_hf"] > 0
    assert "check same model: passed (" in proc.stdout and "check same start: passed (" in proc.stdout
    assert re.search(r"^verdict: genesis-eager is \d+\.\d\dx (faster|slower) than hf-eager at micro-batch 2 ",
                     proc.stdout, re.M), proc.stdout
    assert report["flops_per_token"] > 6 * 1_000_000 and report["peak"]["flops_per_s"] > 0


def test_train_throughput_bad_arguments_fail_with_a_message():
    for args, message in ((["--micro-batches", "four"], "comma-separated integers"),
                          (["--modes", "jax-eager"], "unknown jax-eager"), (["--device", "tpu"], "--device must be")):
        proc = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


CONTEXT_SCRIPT = ROOT / "bench" / "eval_context.py"


def test_eval_context_smoke_run_checks_the_prefix_scorer_then_times_every_case(tiny_runs, tmp_path):
    """bench/eval_context.py on a real (4-step) run: the prefix scorer checked against the full one on the
    3-verse items, then every case timed in every round, the first the baseline of the ratios; bad input is one
    line, exit 2."""
    out = tmp_path / "context.json"
    proc = subprocess.run([sys.executable, str(CONTEXT_SCRIPT), "--checkpoint", str(tiny_runs["tied"]),
                           "--max-items", "6", "--repeats", "2", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(out.read_text())
    check = report["checks"]["3"]
    assert check["ok"] and check["picks_changed"] == 0 and 0 < check["max_abs_diff_nats"] <= check["tolerance_nats"]
    rows = {(r["path"], r["context_verses"]): r for r in report["cases"]}
    assert list(rows) == [("full", 0), ("prefix", 3), ("full", 3)] and rows[("full", 0)]["ratio"] == 1.0
    for row in rows.values():
        assert len(row["times_s"]) == 2 and row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["items"] == rows[("full", 0)]["items"] >= 4  # of 6: a 64-token model skips the longest verses
    assert rows[("prefix", 3)]["tokens_run"] < rows[("full", 3)]["tokens_run"]
    assert "| prefix | 3 | " in proc.stdout and report["run_identity"]["step"] == 4
    for args, message in ((["--cases", "prefix3"], "--cases: expected path:verses"),
                          (["--cases", "cached:3"], "--cases: paths are full, prefix"),
                          (["--checkpoint", str(tmp_path / "none")], "error: ")):
        argv = ["--checkpoint", str(tiny_runs["tied"]), *args] if args[0] == "--cases" else args
        bad = subprocess.run([sys.executable, str(CONTEXT_SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


PROBE_SCRIPT = ROOT / "bench" / "probe_settings.py"


def test_probe_settings_refits_the_probe_under_each_limit(tiny_runs, tmp_path):
    """bench/probe_settings.py on a real (4-step) run: one row per setting, the probe fitted on at most that many
    training occurrences with at most that many iterations, picks compared with the first setting's; bad input
    is one line, exit 2."""
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, str(PROBE_SCRIPT), "--checkpoint", str(tiny_runs["tied"]), "--max-items",
                           "6", "--settings", "20:2,40:50", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    first, second = json.loads(out.read_text())["rows"]
    assert (first["max_iter"], second["max_iter"]) == (2, 50) and first["iterations"] <= 2
    assert first["n_train"] <= 20 < second["n_train"] <= 40 and first["picks_changed"] == 0
    assert 0 <= second["picks_changed"] <= 6 and "| occurrences |" in proc.stdout
    for args, message in ((["--settings", "2000"], "is not occurrences:iterations"),
                          (["--settings", "0:5"], "both must be >= 1"),
                          (["--checkpoint", str(tmp_path / "none")], "error: ")):
        argv = args if args[0] == "--checkpoint" else ["--checkpoint", str(tiny_runs["tied"]), *args]
        bad = subprocess.run([sys.executable, str(PROBE_SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


GPU_RUN = ROOT / "bench" / "gpu_run.sh"


def gpu_run(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """bench/gpu_run.sh on this CPU machine as the GPU machine runs it: `python3` is this interpreter, the output
    goes under tmp_path/out."""
    if shutil.which("bash") is None or not (Path(sys.executable).parent / "python3").exists():
        pytest.skip("needs bash and a python3 beside this interpreter")
    full = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    full.update(PATH=str(Path(sys.executable).parent) + os.pathsep + full.get("PATH", ""), OUT=str(tmp_path / "out"),
                **env)
    return subprocess.run(["bash", str(GPU_RUN), *args], cwd=tmp_path, env=full, capture_output=True, text=True,
                          timeout=300)


def test_gpu_run_script_runs_its_steps_into_out_and_fails_when_a_step_fails(tmp_path):
    """The command a lent GPU machine runs (bench/RESULTS.md, "GPU"), here its `tests` step running CPU
    tests: each step's log and exit status under $OUT, exit 1 when a step fails, usage and exit 2 for an
    unknown step."""
    import torch

    pytest.importorskip("triton")  # env.txt records its version
    ok = gpu_run(tmp_path, "tests", TESTS="tests/test_errors.py")
    assert ok.returncode == 0, f"{ok.stdout}\n{ok.stderr}"
    assert "== tests rc=0" in ok.stdout and " passed" in (tmp_path / "out" / "tests.log").read_text()
    env_txt = (tmp_path / "out" / "env.txt").read_text()
    assert torch.__version__ in env_txt  # the versions line, after nvidia-smi's (here: not found)

    failed = gpu_run(tmp_path, "tests", TESTS="tests/test_errors.py::no_such_test")
    assert failed.returncode == 1 and "== tests rc=4" in failed.stdout  # pytest: no such test (usage error)

    bad = gpu_run(tmp_path, "everything")
    assert bad.returncode == 2 and bad.stderr.strip() == "usage: bench/gpu_run.sh [bench|tests|train|trainbench|all]"
