"""Model sizes on the command line and in the API: flags, --model-config, --preset, sweeps over
them (one more grid axis, the config hash in the key), bad values refused (issue 16)."""
import pytest

from mamba_decoder.bench import runner
from mamba_decoder.bench.api import run_scaling_benchmarks
from mamba_decoder.bench.results import UsageError, read_jsonl
from mamba_decoder.bench.settings import Config, SweepSettings, iter_configs

from .conftest import run

TINY1 = ["--dim", "16", "--seq-lens", "8", "--batch-sizes", "1", "--runs", "1", "--warmup", "0", "--no-cuda",
         "--no-progress", "--no-plots"]


@pytest.mark.parametrize("argv,needle", [
    (["--n-experts", "4", "--n-activated", "8"], "n_activated=8 must be <= n_experts=4"),
    (["--n-experts", "4", "8", "--n-activated", "6"], "n_activated=6 must be <= n_experts=4"),
    (["--d-state", "0"], "--d-state: '0' is not an integer >= 1"),
    (["--heads", "x"], "--heads: 'x' is not an integer >= 1"),
    (["--q-lora-rank", "-1"], "--q-lora-rank: '-1' is not an integer >= 0"),
    (["--qk-rope-dim", "6", "7"], "qk_rope_dim=7 must be even"),
    (["--preset", "gpt-5"], "--preset: 'gpt-5' is not one of: mamba-130m"),
])
def test_bad_sizes_are_one_error_line(tmp_path, capsys, argv, needle):
    code, out, err = run(["run", *TINY1, *argv, "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,needle", [
    ("n_experts = [4, 'x']\n", "n_experts='x': input should be a valid integer"),
    ("n_expert = 4\n", "key 'n_expert' is not one of"),
    ("n_experts = [4,\n", "is not valid TOML"),
    ("d_state = true\n", "d_state=True"),
    ("d_state = [{a = 1}]\n", "model size d_state: {'a': 1} is not an integer"),   # was: unexpected TypeError, exit 1
    ("n_experts = [[4, 8]]\n", "model size n_experts: [4, 8] is not an integer"),
    ("preset = [1]\n", "--preset: [1] is not one of"),
])
def test_bad_model_config_files(tmp_path, capsys, text, needle):
    f = tmp_path / "m.toml"
    f.write_text(text)
    code, out, err = run(["run", *TINY1, "--model-config", str(f), "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1 and needle in err, err


def test_a_sweep_over_a_size_is_one_more_axis_with_distinct_keys(tmp_path, capsys):
    f = tmp_path / "m.toml"
    f.write_text("preset = 'deepseek-v2-lite'\ndim = 16\nexpert_dim = 8\nshared_expert_dim = 16\n"
                 "heads = 2\nkv_lora_rank = 8\nqk_nope_dim = 4\nqk_rope_dim = 4\nv_head_dim = 4\nd_state = 8\n")
    out_dir = tmp_path / "o"
    argv = ["run", *TINY1, "--model-config", str(f), "--n-experts", "8", "16", "--output-dir", str(out_dir)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert out.index("--- n_experts=8 ---") < out.index("--- n_experts=16 ---")   # the console names each point
    recs = read_jsonl(out_dir / "results.jsonl")
    # Regular Mamba once (no MoE: the swept size does not apply), the two MoE blocks twice each
    assert sorted(r.model_name for r in recs) == ["MLABlock", "MLABlock", "MambaDecoderBlock",
                                                  "MambaDecoderBlock", "Regular Mamba"]
    assert len({r.key for r in recs}) == 5 and all(r.ok for r in recs)
    mla = {r.block_config["n_experts"]: r for r in recs if r.model_name == "MLABlock"}
    assert set(mla) == {8, 16} and mla[8].config_hash != mla[16].config_hash
    # the preset's numbers under the file's overrides: top-6 of V2-Lite, its depth at --level model
    assert mla[8].block_config == dict(dim=16, heads=2, q_lora_rank=0, kv_lora_rank=8, qk_nope_dim=4,
                                       qk_rope_dim=4, v_head_dim=4, n_experts=8, n_activated=6,
                                       expert_dim=8, shared_expert_dim=16)
    assert mla[16].num_parameters > mla[8].num_parameters
    # --resume tells the configs apart: nothing is measured again
    code, out, err = run([*argv[:-2], "--output-dir", str(out_dir), "--resume"], capsys)
    assert code == 0 and "resume: 5 configs already recorded ok" in err
    assert len(read_jsonl(out_dir / "results.jsonl")) == 5


def test_flags_win_over_the_file_and_the_preset():
    from mamba_decoder.bench.settings import model_sizes
    m = model_sizes("kimi-k2", {"n_experts": [8], "dim": 64}, sizes={"n_experts": [4], "heads": None})
    assert m["dim"] == 64 and m["depth"] == 61 and m["vocab_size"] == 163840
    assert m["sizes"]["n_experts"] == [4] and m["sizes"]["heads"] == [64]


def test_isolated_worker_gets_the_sizes(tmp_path):
    s = SweepSettings(dim=16, sequence_lengths=[8], batch_sizes=[1], models=["MambaDecoderBlock"], runs=1,
                      warmup=0, sizes={"n_experts": [3], "d_state": [4]})
    (cfg,) = list(iter_configs(s))
    r = runner.measure_isolated(cfg, s)
    assert r.ok, r.message
    assert r.block_config["n_experts"] == 3 and r.key == cfg.key(s)
    assert Config(**{**cfg.__dict__, "block_config": [list(p) for p in cfg.block_config]}) == cfg


def test_the_api_takes_the_same_keywords():
    recs = run_scaling_benchmarks(dim=16, sequence_lengths=[8], batch_sizes=[1], use_cuda=False,
                                  models=["MLABlock"], runs=1, warmup=0, verbose=False, progress=False,
                                  heads=[2, 4], kv_lora_rank=8, qk_nope_dim=4, qk_rope_dim=4, v_head_dim=4,
                                  n_experts=4)
    assert [r.block_config["heads"] for r in recs] == [2, 4] and all(r.ok for r in recs)
    with pytest.raises(UsageError, match="n_activated=5 must be <= n_experts=4"):
        run_scaling_benchmarks(dim=16, use_cuda=False, n_experts=4, n_activated=5, verbose=False)


@pytest.mark.parametrize("kw,needle", [
    (dict(d_state=[[16]]), "model size d_state: [16] is not an integer"),
    (dict(n_experts={8, 16}), "model size n_experts: {8, 16} is not an integer"),
    (dict(model_config={"d_state": [{"a": 1}]}), "model size d_state: {'a': 1} is not an integer"),
    (dict(model_config=5), "model_config: 5 is not a TOML file's path or a dict"),
    (dict(preset=["x"]), "--preset: ['x'] is not one of"),
])
def test_the_api_names_a_bad_size_in_one_value_error(kw, needle):
    """The README's promise: a bad argument raises one ValueError naming it (these were TypeErrors)."""
    with pytest.raises(ValueError) as e:
        run_scaling_benchmarks(dim=16, sequence_lengths=[8], batch_sizes=[1], use_cuda=False, runs=1, warmup=0,
                               models=["Regular Mamba"], verbose=False, progress=False, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_presets_command_lists_sources(capsys):
    code, out, err = run(["presets"], capsys)
    assert code == 0
    for name in ("mamba-130m", "mamba-2.8b", "deepseek-v2-lite", "deepseek-v3", "kimi-k2"):
        assert f"\n{name}: dim=" in "\n" + out
    assert "source: DeepSeek-V3 (671B): deepseek-ai/DeepSeek-V3, inference/configs/config_671B.json" in out


def test_tables_and_plots_tell_configs_apart(tmp_path, monkeypatch):
    from mamba_decoder.bench import plots
    from mamba_decoder.bench.plots import plot_benchmark_results
    monkeypatch.setattr(plots, "DPI", 30)   # what is drawn, not how finely
    from mamba_decoder.bench.report import speedups, summary_table

    from .conftest import make_record
    recs = [make_record("Regular Mamba", seq=q, block_config=dict(dim=32, d_state=16)) for q in (8, 16)]
    recs += [make_record("MLABlock", seq=q, samples=(n / 4,) * 3, block_config=dict(dim=32, n_experts=n),
                         config_hash=f"h{n}") for n in (4, 8) for q in (8, 16)]
    table = summary_table(recs)
    assert "MLABlock (n_experts=4)" in table and "MLABlock (n_experts=8)" in table
    assert [round(sp, 3) for _, sp in speedups(recs)] == [1.0, 1.0, 0.5, 0.5]
    paths = plot_benchmark_results(recs, tmp_path)
    assert tmp_path / "param_sweep_n_experts.png" in paths
