"""The co-design flow (hls/flow.py) on a tiny random Mixtral: every step, resuming, stopping,
bad input, and a budget nothing fits."""

import dataclasses
import json
import re
import shutil

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moegen.boards import BOARDS, BoardSpec
from moegen.cli import main
from moegen.config import load_config
from moegen.errors import UserError
from moegen.golden.image import read_image
from moegen.golden.pack import prune_mn
from moegen.hls.flow import STEPS, FlowOptions, choose_k, compile_model, experts_per_token, limit_k

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


@pytest.mark.verilator
def test_the_emitted_config_runs_its_images_on_its_harness(compiled):
    """Every image the config sizes its memory for, then the largest batch the plugin sends
    (k experts for each of max_tokens rows), bit-exact against golden."""
    from moegen.golden.device import WEIGHT_ONE
    from moegen.golden.expert import expert_int
    from moegen.host.device import open_device
    from moegen.host.sim import build, launch
    from moegen.rtl.testbench.device import random_tokens

    config = load_config(str(compiled / "emit" / "config.yaml"))
    report = json.loads((compiled / "emit" / "report.json").read_text())
    paths = sorted((compiled / "emit" / "images").iterdir())[:report["size-hardware"]["images_in_memory"]]
    rows, k = config.model.max_tokens, config.router.k_max
    x_q, mult, shift = random_tokens(config, rows, 7)
    with launch(build(config)) as harness, open_device(config, "sim", address=harness.socket) as device:
        experts = []
        for path in paths:
            data = path.read_bytes()
            header, expert = read_image(data, config_hash=config.device_hash, layout=config.image_layout)
            experts.append((device.upload_expert(data, expert=header.expert_id), expert))
        calls = [experts[(row * k + j) % len(experts)] for row in range(rows) for j in range(k)]
        batch, expected = [], torch.zeros(rows, config.model.hidden, dtype=torch.int64)
        for index in range(min(len(experts), k * rows)):  # each expert call on the rows that chose it
            chosen = [i // k for i, call in enumerate(calls) if call is experts[index]]
            handle, expert = experts[index]
            weight = WEIGHT_ONE // 2
            batch.append((handle, x_q[chosen], mult[chosen], shift[chosen], chosen, [weight] * len(chosen)))
            expected[chosen] += weight * expert_int(x_q[chosen], mult[chosen], shift[chosen], expert)
        assert torch.equal(device.run_experts(batch, rows), expected)


def test_report_figures(compiled):
    report = json.loads((compiled / "emit" / "report.json").read_text())
    k = report["choose-k"]
    assert all(1 <= layer_k <= 2 for layer_k in k["k"])
    assert len(k["top_p"]) == 2 and all(p is None or 0 < p < 1 for p in k["top_p"])
    assert k["ppl_chosen"] <= k["ppl_int8"] * (1 + k["ppl_budget"])
    assert all(sum(share) == pytest.approx(1) and share[0] == 0 for share in k["experts_per_token"])
    assert k["macs_saved"] == pytest.approx(1 - sum(map(experts_per_token, k["experts_per_token"])) / 4)
    assert report["prune"]["method"] == "sparsegpt" and "recovery" not in report["prune"]
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


def _pruned(out):
    return [expert[name] for layer in torch.load(out / "prune" / "pruned.pt", weights_only=True)["experts"]
            for expert in layer for name in ("gate", "up", "down")]


def test_prune_with_recovery(compiled, tmp_path):
    runs = {}
    for name, steps in (("plain", 0), ("recovered", 3), ("again", 3)):
        out = tmp_path / name
        shutil.copytree(compiled / "profile", out / "profile")
        options = dataclasses.replace(_options(compiled, out), prune_method="wanda", recover_steps=steps)
        runs[name] = compile_model(options, start="prune", stop="quantize", progress=lambda line: None)["prune"]
        assert len(list((out / "quantize" / "images").iterdir())) == 2 * 4
    assert "recovery" not in runs["plain"]
    prune = runs["recovered"]
    assert prune["method"] == "wanda" and list(prune["mean_output_error"]) == ["magnitude", "wanda"]
    assert prune["recovery"]["steps"] == 3 and prune["recovery"]["loss_last"] < prune["recovery"]["loss_first"]
    assert runs["again"] == prune
    changed = False
    for plain, recovered, again in zip(*(_pruned(tmp_path / name) for name in runs), strict=True):
        assert torch.equal(recovered, again)
        changed |= not torch.equal(recovered, plain)
        assert not bool(recovered[plain == 0].any())  # the masks held: pruned weights stay zero
        assert torch.equal(prune_mn(recovered, 2, 4), recovered)
    assert changed


@pytest.mark.parametrize(("changes", "message"), [
    ({"prune_method": "obs"}, "--prune-method must be one of magnitude, wanda, sparsegpt, not 'obs'"),
    ({"recover_steps": -1}, "--recover-steps must be an integer in 0..100000 (0: no fine-tune), not -1"),
    ({"recover_steps": 2.5}, "--recover-steps must be an integer in 0..100000 (0: no fine-tune), not 2.5"),
    ({"recover_steps": True}, "--recover-steps must be an integer in 0..100000 (0: no fine-tune), not True"),
])
def test_bad_prune_options(compiled, tmp_path, changes, message):
    options = dataclasses.replace(_options(compiled, tmp_path / "out"), **changes)
    with pytest.raises(UserError, match=re.escape(message)):
        compile_model(options, progress=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_from_without_earlier_results(tiny_model, tmp_path):
    with pytest.raises(UserError, match="no result of step 'profile'"):
        compile_model(FlowOptions(tiny_model, "ulx3s-85f", tmp_path / "out"), start="prune")


def test_budget_nothing_fits_names_the_resource(compiled, tmp_path, monkeypatch):
    ulx3s = BOARDS["ulx3s-85f"]
    monkeypatch.setitem(BOARDS, "small-ecp5", BoardSpec("small-ecp5", "ecp5", "LFE5U-12F", "CABGA256", 12_000, 12_000,
                                                        8, 32 * 18_432, 0, 25.0, "yowasp", ulx3s.platform,
                                                        ulx3s.reset))
    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    shutil.rmtree(out / "size-hardware")
    with pytest.raises(UserError, match=r"nothing fits board small-ecp5: .* needs \d+ DSPs of 8 \(over by \d+\)"):
        compile_model(_options(compiled, out, "small-ecp5"), start="size-hardware", progress=lambda line: None)
    assert not (out / "size-hardware").exists()
    assert not list(out.glob(".*.partial"))


def test_limit_k_keeps_the_first_choices():
    router = torch.nn.Identity()
    limit_k(router, 1)
    weights, index = torch.tensor([[0.6, 0.4]]), torch.tensor([[3, 1]])
    _, kept, kept_index = router((torch.zeros(1, 4), weights, index))
    assert kept_index.tolist() == [[3]] and kept.tolist() == [[1.0]]


def test_limit_k_top_p_cuts_after_the_threshold():
    router = torch.nn.Identity()
    tally = torch.zeros(4, dtype=torch.int64)
    limit_k(router, 3, top_p=0.7, tally=tally)
    weights = torch.tensor([[0.8, 0.15, 0.05], [0.5, 0.3, 0.2], [0.4, 0.2, 0.1]])
    index = torch.tensor([[0, 1, 2], [3, 2, 1], [1, 0, 3]])
    _, kept, kept_index = router((torch.zeros(3, 4), weights, index))
    assert torch.equal(kept, torch.tensor([[0.8, 0, 0], [0.5, 0.3, 0], [0.4, 0.2, 0.1]]))
    assert torch.equal(kept_index, index)
    assert tally.tolist() == [0, 1, 1, 1]


def test_limit_k_rescales_then_cuts():
    router = torch.nn.Identity()
    tally = torch.zeros(3, dtype=torch.int64)
    limit_k(router, 2, top_p=0.6, tally=tally)
    weights, index = torch.tensor([[0.5, 0.25, 0.25], [0.3, 0.3, 0.4]]), torch.tensor([[0, 1, 2], [1, 2, 0]])
    _, kept, kept_index = router((torch.zeros(2, 4), weights, index))
    # rescaled to the full total: [2/3, 1/3] (cut after the first) and [0.5, 0.5] (both kept)
    assert kept[0].tolist() == pytest.approx([2 / 3, 0]) and kept[1].tolist() == pytest.approx([0.5, 0.5])
    assert kept_index.tolist() == [[0, 1], [1, 2]] and tally.tolist() == [0, 1, 1]


def _measure_table(table, k_model=2):
    """A ``measure`` for :func:`choose_k` from ``table[(layer, (k, top_p))] = (ppl loss, experts)``;
    the gatings it was asked for go into its ``calls``."""

    def measure(gating):
        measure.calls.append(list(gating))
        ppl, shares = 10.0, []
        for layer, option in enumerate(gating):
            loss, experts = table.get((layer, option), (0.0, k_model))
            ppl += loss
            shares.append([0.0, k_model - experts, experts - 1] if k_model == 2 else [0.0] * k_model + [1.0])
        return ppl, shares

    measure.calls = []
    return measure


def test_choose_k_saves_the_most_calls_within_the_budget():
    table = {(0, (2, 0.9)): (0.02, 1.9), (0, (2, 0.8)): (0.05, 1.6), (0, (1, None)): (0.5, 1.0),
             (1, (2, 0.9)): (0.01, 1.5), (1, (2, 0.8)): (0.08, 1.4), (1, (1, None)): (0.09, 1.0)}
    measure = _measure_table(table)
    gating, reference, final, shares, trials = choose_k(measure, 2, 2, 0.01, thresholds=(0.9, 0.8))
    # budget 0.1: layer 1 at k 1 (0.09) saves 1.0 call; 0.8 on layer 0 and 0.9 on layer 1 (0.06) only 0.9
    assert gating == [(2, None), (1, None)]
    assert reference == 10.0 and final == pytest.approx(10.09)
    assert [t["kept"] for t in trials if "layer" in t] == [True, True, False, True, True, True]
    assert shares[1] == [0.0, 1.0, 0.0]
    assert len(measure.calls) == 1 + 3 + 3 + 1


def test_choose_k_drops_options_the_combination_cannot_afford():
    table = {(0, (1, None)): (0.05, 1.0), (1, (1, None)): (0.04, 1.0)}
    measure = _measure_table(table)

    def interacting(gating):
        ppl, shares = measure(gating)
        return ppl + (0.05 if gating == [(1, None), (1, None)] else 0.0), shares

    gating, _, final, _, trials = choose_k(interacting, 2, 2, 0.01, thresholds=())
    # both layers at k 1 add up to 0.09 but measure 0.14: the allowance shrinks to 0.0675, the
    # cheaper layer alone (ties in calls go to the smaller loss)
    assert gating == [(2, None), (1, None)] and final == pytest.approx(10.04)
    assert [t["kept"] for t in trials if "gating" in t] == [False, True]


def test_choose_k_keeps_the_model_k_when_nothing_fits():
    measure = _measure_table({(0, (1, None)): (1.0, 1.0)})
    gating, reference, final, _, _ = choose_k(measure, 2, 1, 0.01, thresholds=())
    assert gating == [(2, None)] and final == reference


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
    (["--prune-method", "obs"], "--prune-method must be one of magnitude, wanda, sparsegpt, not 'obs'"),
    (["--recover-steps", "-1"], "--recover-steps must be an integer in 0..100000"),
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


def test_choose_k_drops_a_free_option_that_fails_in_combination():
    """Each layer at k 1 costs nothing alone (-0.01) but both together go over the budget:
    the search keeps one of them instead of giving up."""
    def measure(gating):
        cut = [layer for layer, option in enumerate(gating) if option == (1, None)]
        ppl = 10.0 + (0.48 if len(cut) == 2 else -0.01 * len(cut))
        return ppl, [[0.0, 1.0, 0.0] if layer in cut else [0.0, 0.0, 1.0] for layer in range(2)]

    gating, reference, final, _, _ = choose_k(measure, 2, 2, 0.01, thresholds=())
    assert reference == 10.0
    assert sorted(gating) == [(1, None), (2, None)] and final == pytest.approx(9.99)
