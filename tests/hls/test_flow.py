"""The co-design flow (hls/flow.py) on a tiny random Mixtral: every step, resuming, stopping,
bad input, and a budget nothing fits."""

import json
import shutil

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moegen.boards import BOARDS, BoardSpec
from moegen.cli import main
from moegen.config import load_config
from moegen.errors import UserError
from moegen.golden.image import read_image
from moegen.hls.flow import STEPS, FlowOptions, activation_aware_prune, compile_model, limit_k

SIZES = ["--calibration-bytes", "256", "--heldout-bytes", "512"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=512)
    folder = tmp_path_factory.mktemp("tiny-mixtral")
    MixtralForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def compiled(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "out"
    assert main(["compile", str(tiny_model), "--board", "ulx3s-85f", "--out", str(out), *SIZES]) == 0
    return out


def test_every_step_writes_its_folder(compiled):
    assert sorted(p.name for p in compiled.iterdir()) == sorted(STEPS)
    for step in STEPS:
        assert (compiled / step / "result.json").is_file()
    emit = compiled / "emit"
    assert {"config.yaml", "report.md", "report.json", "images"} <= {p.name for p in emit.iterdir()}


def test_emitted_config_and_images_load(compiled):
    config = load_config(str(compiled / "emit" / "config.yaml"))
    report = json.loads((compiled / "emit" / "report.json").read_text())
    assert config.hash == report["size-hardware"]["hash"]
    assert (config.model.hidden, config.model.ffn, config.router.experts, config.model.layers) == (16, 32, 4, 2)
    images = sorted((compiled / "emit" / "images").iterdir())
    assert len(images) == 2 * 4
    for path in images:
        _, expert = read_image(path.read_bytes(), config_hash=config.device_hash, layout=config.image_layout)
        assert (expert.gate.layout.m, expert.gate.layout.n) == (config.array.m, config.array.n)


def test_report_figures(compiled):
    report = json.loads((compiled / "emit" / "report.json").read_text())
    k = report["choose-k"]
    assert all(1 <= layer_k <= 2 for layer_k in k["k"])
    assert k["ppl_chosen"] <= k["ppl_int8"] * (1 + k["ppl_budget"])
    assert k["macs_saved"] == pytest.approx(1 - sum(k["k"]) / 4)
    hw = report["size-hardware"]
    assert all(hw["resources"][key] <= hw["budget"][key] for key in hw["budget"])
    assert [len(layer["host"]) for layer in report["place"]["layers"]] == [1, 1]


def _options(compiled, out, board="ulx3s-85f"):
    model_dir = json.loads((compiled / "emit" / "report.json").read_text())["model_dir"]
    return FlowOptions(model_dir, board, out, 256, 512)


def test_from_resumes_and_until_stops(compiled, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    shutil.rmtree(out / "emit")
    shutil.rmtree(out / "size-hardware")
    lines = []
    results = compile_model(_options(compiled, out), start="place", stop="size-hardware", progress=lines.append)
    assert list(results) == ["place", "size-hardware"]
    assert not (out / "emit").exists()
    assert lines[0].startswith("[5/7] place") and lines[-1].startswith("done")
    compile_model(_options(compiled, out), start="emit", progress=lines.append)
    assert (out / "emit" / "config.yaml").read_text() == (compiled / "emit" / "config.yaml").read_text()


def test_from_without_earlier_results(tiny_model, tmp_path):
    with pytest.raises(UserError, match="no result of step 'profile'"):
        compile_model(FlowOptions(tiny_model, "ulx3s-85f", tmp_path / "out"), start="prune")


def test_budget_nothing_fits_names_the_resource(compiled, tmp_path, monkeypatch):
    ulx3s = BOARDS["ulx3s-85f"]
    monkeypatch.setitem(BOARDS, "small-ecp5", BoardSpec("small-ecp5", "ecp5", "LFE5U-12F", "CABGA256", 12_000, 12_000,
                                                        28, 32 * 18_432, 0, 25.0, "yowasp", ulx3s.platform,
                                                        ulx3s.reset))
    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    shutil.rmtree(out / "size-hardware")
    with pytest.raises(UserError, match=r"nothing fits board small-ecp5: .* needs \d+ DSPs of 28 \(over by \d+\)"):
        compile_model(_options(compiled, out, "small-ecp5"), start="size-hardware", progress=lambda line: None)
    assert not (out / "size-hardware").exists()
    assert not list(out.glob(".*.partial"))


def test_limit_k_keeps_the_first_choices():
    router = torch.nn.Identity()
    limit_k(router, 1)
    weights, index = torch.tensor([[0.6, 0.4]]), torch.tensor([[3, 1]])
    _, kept, kept_index = router((torch.zeros(1, 4), weights, index))
    assert kept_index.tolist() == [[3]] and kept.tolist() == [[1.0]]


def test_activation_aware_prune_follows_input_scale():
    from moegen.golden.expert import ExpertWeights

    ones = torch.ones(4, 4)
    weights = ExpertWeights(ones, ones, torch.ones(4, 4))
    x = torch.tensor([[0.1, 0.1, 5.0, 4.0]] * 8)
    pruned = activation_aware_prune(weights, x, 2, 4)
    assert pruned.gate[0].tolist() == [0, 0, 1, 1]


def _model_folder(tmp_path, config):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("args", "message"), [
    (["--until", "synthesize"], "unknown step 'synthesize' for --until"),
    (["--from", "emit", "--until", "profile"], "comes after"),
    (["--board", "nexys"], "unknown board 'nexys'; known boards: ulx3s-85f"),
    (["--board", "icebreaker"], "no resource model for FPGA family 'ice40'"),
    (["--ppl-budget", "3"], "--ppl-budget must be in 0..1"),
])
def test_bad_arguments(tiny_model, tmp_path, capsys, args, message):
    argv = ["compile", str(tiny_model), "--out", str(tmp_path / "out"), *SIZES, *args]
    if "--board" not in args:
        argv += ["--board", "ulx3s-85f"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("moegen: error:") and message in err[-1]
    assert not list((tmp_path / "out").glob(".*.partial"))
    assert not (tmp_path / "out" / "place").exists()


def test_bad_host_experts(compiled, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    shutil.rmtree(out / "place")
    argv = ["compile", str(tiny_model), "--board", "ulx3s-85f", "--out", str(out), "--from", "place",
            "--host-experts", "9"]
    assert main(argv) == 2
    assert "--host-experts must be in 0..4 (experts per layer), not 9" in capsys.readouterr().err
    assert not (out / "place").exists() and not list(out.glob(".*.partial"))


@pytest.mark.parametrize(("config", "message"), [
    (None, "not a model folder"),
    ({"model_type": "llama"}, "model type 'llama' is not supported"),
])
def test_bad_model(tmp_path, capsys, config, message):
    folder = tmp_path / "model"
    if config is None:
        folder.mkdir()
    else:
        folder = _model_folder(tmp_path, config)
    assert main(["compile", str(folder), "--board", "ulx3s-85f", "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*"))
