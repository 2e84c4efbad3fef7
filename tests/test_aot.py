"""fifa_jax.aot: the ahead-of-time check on a compile-only TPU v5e 2x2 (libtpu, no TPU).

A small SD-layout pipeline (config files only, written to a temporary folder) is compiled for
four v5e chips: the train step data-parallel, with FSDP over the four chips and with remat,
the sampler loop with guidance and the reward's score step. The compiled programs must hold
no CPU custom call, FSDP must lower the per-chip arguments and remat the temporaries; a
program over the HBM ends in one error line naming it and the settings to change, and the
CLI writes the JSON fields. Compiles are shared through module fixtures (each train step takes
about a minute on two busy cores).
"""
import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import pytest

pytestmark = [pytest.mark.tpu,
              pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                 reason="needs libtpu (pip install -e .[tpu])")]

from fifa_jax import parallel  # noqa: E402
from fifa_jax.aot import analysis, layouts, topology  # noqa: E402

TOPOLOGY = "v5e:2x2"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_layout(root: str) -> None:
    """A one-level SD1.5-layout pipeline and a small CLIP reward (config files only)."""
    unet = dict(layouts.UNET_SD15, block_out_channels=[32], attention_head_dim=4,
                cross_attention_dim=32, sample_size=8, layers_per_block=1, norm_num_groups=8,
                down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"])
    vae = dict(layouts.VAE_SD15, block_out_channels=[16, 32], layers_per_block=1,
               down_block_types=["DownEncoderBlock2D"] * 2, norm_num_groups=8,
               up_block_types=["UpDecoderBlock2D"] * 2, sample_size=64)
    text = dict(layouts.CLIP_L_TEXT, hidden_size=32, intermediate_size=64,
                num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=16)
    files = {f"base/{k}": v for k, v in layouts.pipeline_layout(
        unet, vae, layouts.SCHED_SD15, [text], "StableDiffusionPipeline").items()}
    reward = json.loads(json.dumps(layouts.PICKSCORE))
    reward["projection_dim"] = 32
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_hidden_layers=2, projection_dim=32)
    reward["text_config"].update(small, max_position_embeddings=16)
    reward["vision_config"].update(small, image_size=32, patch_size=8)
    files["reward/config.json"] = reward
    for rel, obj in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f)


CONFIG_FILE = '''
import ml_collections
from fifa_jax import parallel
from fifa_jax.evaluation import stage as eval_stage
from fifa_jax.scoring import stage as score_stage
from fifa_jax.selection import stage as select_stage
from fifa_jax.training import encode, train


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = "score,select,encode,train,evaluate"
    c.mesh = parallel.default_config()
    c.score = score_stage.default_config()
    c.score.reward.path = arg + "/reward"
    c.score.reward.batch_size = 4
    c.select = select_stage.default_config()
    c.encode = encode.default_config()
    c.encode.base_model = arg + "/base"
    c.encode.resolution = 32              # 16 x 16 latents (the tiny VAE halves)
    c.encode.batch_size = 2
    c.train = train.default_config()
    c.train.batch_size = 8                # 2 pairs a chip
    c.train.grad_accum = 1
    c.evaluate = eval_stage.default_config()
    c.evaluate.num_steps = 2
    return c
'''


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot")
    _tiny_layout(str(path))
    (path / "tiny_config.py").write_text(CONFIG_FILE)
    return str(path)


def _config(root, **train):
    from fifa_jax.config_check import load_config_file
    c = load_config_file(os.path.join(root, "tiny_config.py") + ":" + root)
    for k, v in train.items():
        if k.startswith("mesh_"):
            c.mesh[k[5:]] = v
        else:
            c.train[k] = v
    return c


@pytest.fixture(scope="module")
def base(root):
    from fifa_jax.aot import run_check
    res = run_check(_config(root), TOPOLOGY, only=("score_step", "train_step", "sample"))
    return {r["program"]: r for r in res}


@pytest.fixture(scope="module")
def fsdp(root):
    from fifa_jax.aot import run_check
    return run_check(_config(root, mesh_fsdp=4, mesh_data=1), TOPOLOGY,
                     only=("train_step",))[0]


@pytest.fixture(scope="module")
def remat(root):
    from fifa_jax.aot import run_check
    return run_check(_config(root, remat="nothing_saveable"), TOPOLOGY, only=("train_step",))[0]


@pytest.fixture(scope="module")
def host(root):
    """train.accumulate="host", mesh.param_tactic="zero" over four chips, 4 micro-batches
    an update."""
    from fifa_jax.aot import run_check
    res = run_check(_config(root, mesh_fsdp=4, mesh_data=1, mesh_param_tactic="zero",
                            grad_accum=4, accumulate="host"),
                    TOPOLOGY, only=("train_micro_step", "train_update"))
    return {r["program"]: r for r in res}


def _data_bytes(r):
    """Per-chip bytes less the generated code (which a tiny model's buffers do not dwarf)."""
    return r["bytes_per_chip"] - r["code_bytes"]


def test_programs_compile_for_tpu_without_cpu_custom_calls(base, fsdp):
    assert set(base) == {"score_step", "train_step", "sample"}
    for r in list(base.values()) + [fsdp]:
        assert r["compiled"] and r["fits"], r
        assert r["device_kind"] == "TPU v5 lite" and r["chips"] == 4
        assert r["hbm_bytes"] == int(15.75 * 2 ** 30)
        assert analysis.cpu_only_targets(r["custom_calls"]) == []
        assert not any(t.startswith("fifa_") or "cpu" in t.lower() for t in r["custom_calls"])
        assert r["flops"] > 0
        assert r["estimated_seconds"] is None or r["estimated_seconds"] > 0
        assert r["bytes_per_chip"] == (r["argument_bytes"] + r["output_bytes"]
                                       - r["alias_bytes"] + r["temp_bytes"] + r["code_bytes"])
    step = base["train_step"]
    assert step["alias_bytes"] > 0                          # the state is donated
    assert step["settings"]["pairs_per_chip"] == 2
    assert step["collectives"]["all-reduce"]["count"] >= 1  # data parallel: gradients summed


def test_loop_factor_reads_the_trip_count_xla_cost_leaves_out():
    """XLA's cost analysis counts a loop body once; `loop_factor` reads the trip count from
    the compiled loop's condition (compiled TPU HLO has no known_trip_count)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from fifa_jax.aot import tpu_devices
    devices = tpu_devices(TOPOLOGY)
    x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=NamedSharding(
        Mesh(np.array(devices[:1]), ("d",)), PartitionSpec()))
    looped = jax.jit(lambda w: jax.lax.fori_loop(0, 7, lambda i, a: jnp.tanh(a @ w), w))
    once = jax.jit(lambda w: jnp.tanh(w @ w))
    c_loop, c_once = looped.lower(x).compile(), once.lower(x).compile()
    assert analysis.loop_factor(c_loop.as_text()) == 7
    assert analysis.loop_factor(c_once.as_text()) == 1
    flops = [analysis._cost(c)["flops"] for c in (c_loop, c_once)]
    assert flops[0] == pytest.approx(flops[1], rel=0.05)        # one pass, not seven


def test_sampler_row_says_its_cost_is_one_step(base):
    from fifa_jax.aot import row
    sample = base["sample"]
    assert sample["loop_factor"] == 2                 # evaluate.num_steps of the tiny config
    assert "(1 of 2 passes)" in row(sample)
    assert base["score_step"]["loop_factor"] == 1 and "passes" not in row(base["score_step"])


def test_fsdp_lowers_per_chip_memory(base, fsdp):
    step = base["train_step"]
    assert fsdp["settings"]["mesh"] == {"data": 1, "fsdp": 4}
    # policy, optimiser state and reference split over four chips
    assert fsdp["argument_bytes"] < 0.5 * step["argument_bytes"]
    assert _data_bytes(fsdp) < _data_bytes(step)
    col = fsdp["collectives"]
    assert col["all-gather"]["count"] > 0                   # weights gathered, not activations
    assert col["all-gather"]["bytes"] > 0


def test_remat_lowers_temporaries(base, remat):
    step = base["train_step"]
    assert remat["settings"]["remat"] == "nothing_saveable"
    assert remat["temp_bytes"] < step["temp_bytes"]
    assert _data_bytes(remat) < _data_bytes(step)
    assert remat["flops"] > step["flops"]                   # the forward runs again


def test_host_accumulation_with_zero_compiles_a_micro_step_and_an_update(host, fsdp):
    """accumulate="host": two loop-free programs; the micro-step's arguments hold the whole
    state (optimiser moments too) and the gradient buffer, so its memory is the step's. Under
    "zero" the micro-step gathers no weight and reduces the gradients (XLA picks all-reduce
    or reduce-scatter, then keeps the accumulator's shard); the update all-gathers the new
    parameters."""
    assert set(host) == {"train_micro_step", "train_update"}
    for r in host.values():
        assert r["compiled"] and r["fits"], r
        assert analysis.cpu_only_targets(r["custom_calls"]) == []
        assert r["settings"]["grad_accum"] == 4 and r["settings"]["mesh"] == {"data": 1,
                                                                            "fsdp": 4}
        assert r["settings"]["param_tactic"] == "zero"
    micro, update = host["train_micro_step"], host["train_update"]
    # FSDP's scan step holds a quarter of state + reference; this one whole weights more
    assert micro["argument_bytes"] > fsdp["argument_bytes"]
    assert micro["alias_bytes"] > 0 and update["alias_bytes"] > 0     # grads / state donated
    assert micro["collectives"]["all-gather"]["count"] == 0
    col = micro["collectives"]
    assert col["reduce-scatter"]["count"] + col["all-reduce"]["count"] > 0
    assert update["collectives"]["all-gather"]["count"] > 0
    assert micro["flops"] > 100 * update["flops"]                     # the UNet is in the first


def test_scaling_counts_a_step_as_the_micro_steps_and_the_update(host):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import scaling
    micro, update = host["train_micro_step"], host["train_update"]
    step = scaling._train_step([micro, update], 4)
    assert step["flops"] == 4 * micro["flops"] + update["flops"]
    assert step["bytes_per_chip"] == max(micro["bytes_per_chip"], update["bytes_per_chip"])
    assert step["fits"] and step["compiled"]
    assert step["collectives"]["all-gather"]["count"] == update["collectives"]["all-gather"][
        "count"]
    if micro["estimated_seconds"]:
        assert step["estimated_seconds"] == pytest.approx(
            4 * micro["estimated_seconds"] + update["estimated_seconds"])


def test_scaling_row_from_saved_check_results(host, root):
    """`scaling.py --from_json`: the row of a saved `fifa_jax.aot --json` list equals what the
    sweep computes, the step's FLOPs four micro-steps and the update."""
    import json
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import scaling
    config = _config(root, mesh_fsdp=4, mesh_data=1, mesh_param_tactic="zero", grad_accum=4,
                     accumulate="host")
    saved = json.loads(json.dumps(list(host.values())))       # as --json writes them
    row = scaling.to_row("sd15", "v5e", 4, config, saved, 1.0)
    micro, update = host["train_micro_step"], host["train_update"]
    assert row["topology"] == "v5e:2x2" and row["param_tactic"] == "zero"
    assert row["fsdp"] == 4 and row["grad_accum"] == 4 and row["compiled"] and row["fits"]
    assert row["tflop_per_chip"] == pytest.approx((4 * micro["flops"] + update["flops"]) / 1e12,
                                                  abs=1e-3)
    eff = row["effective_batch"]
    assert eff == int(config.train.batch_size) * 4
    assert row["est_pairs_per_s"] == pytest.approx(eff / row["est_step_s"], rel=1e-2)
    with pytest.raises(KeyError):
        scaling.to_row("sd15", "v5e", 4, config, saved[:1], 1.0)


def test_scaling_from_json_reads_a_saved_check_into_the_recipes_row(host, root, tmp_path):
    """`scaling.py --from_json sd15:FILE`: the row of the file's results under the recipe the
    file's slice names; a file without the model's programs is refused, naming the file."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import scaling
    saved = [dict(r, compile_seconds=10.0 + i) for i, r in enumerate(host.values())]
    path = tmp_path / "check.json"
    path.write_text(json.dumps(saved))
    row = scaling.from_json(f"sd15:{path}", root)
    config = scaling._config("sd15", root, "v5e-4")
    assert row == scaling.to_row("sd15", "v5e", 4, config, saved, 21.0)
    assert row["grad_accum"] == config.train.grad_accum               # the recipe's, not the file's
    path.write_text(json.dumps(saved[:1]))
    with pytest.raises(SystemExit, match="check.json: no train_update result"):
        scaling.from_json(f"sd15:{path}", root)


def test_json_keeps_the_programs_finished_when_a_check_is_cut_short(root, tmp_path,
                                                                    monkeypatch):
    """The CLI saves its JSON after each program: the first program's result survives the
    second program's compile being interrupted."""
    from fifa_jax.aot import run_check, save_json
    real, seen = analysis.check, []

    def check(program, hbm):
        seen.append(program.name)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(program, hbm)
    monkeypatch.setattr(analysis, "check", check)
    path = str(tmp_path / "r.json")
    with pytest.raises(KeyboardInterrupt):
        run_check(_config(root), TOPOLOGY, only=("score_step", "score_text"),
                  on_result=lambda res: save_json(res, path))
    rows = json.loads(open(path, encoding="utf-8").read())
    assert [r["program"] for r in rows] == ["score_step"] and rows[0]["compiled"]
    assert not os.path.exists(path + ".tmp")


def test_not_fitting_program_is_one_line_naming_the_settings(root):
    from fifa_jax.aot import failure_line, run_check
    r = run_check(_config(root), TOPOLOGY, hbm_gib=0.0001, only=("score_step",))[0]
    assert r["compiled"] and not r["fits"]
    line = failure_line(r)
    assert "\n" not in line
    assert line.startswith("error: score_step does not fit on 4 x TPU v5 lite (v5e:2x2)")
    assert "0.1 MiB available" in line and "MiB a chip" in line
    assert "score.reward.batch_size" in line


def test_compiler_out_of_memory_is_reported_with_its_sizes():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from fifa_jax.aot import programs
    devices = topology.tpu_devices(TOPOLOGY)
    mesh = topology.mesh_over(devices, parallel.default_config())
    x = jax.ShapeDtypeStruct((50_000, 100_000), jnp.float32, sharding=NamedSharding(mesh, P()))
    prog = programs.Program("sort", "test", jax.jit(lambda a: jnp.sort(a, axis=0)[::7]), (x,),
                            mesh, {}, "lower the size")
    r = analysis.check(prog, topology.hbm_bytes(devices[0]))
    assert not r["compiled"] and not r["fits"]
    assert r["error"].startswith("RESOURCE_EXHAUSTED")
    assert r["argument_bytes"] == 50_000 * 100_000 * 4
    assert r["temp_bytes"] > 15.75 * 2 ** 30 and r["compiler_available_bytes"] == 15.75 * 2 ** 30
    assert r["bytes_per_chip"] == r["argument_bytes"] + r["temp_bytes"]


def test_cli_writes_json_and_exits_1_when_a_program_does_not_fit(root, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fifa_jax.aot", "--config",
         os.path.join(root, "tiny_config.py") + ":" + root, "--topology", "v5e-4",
         "--programs", "score_step,score_text", "--hbm_gib", "0.0001", "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: score_text does not fit"), proc.stderr
    assert not any("TPU_ACCELERATOR_TYPE" in ln or "TPU_WORKER_HOSTNAMES" in ln
                   for ln in proc.stderr.splitlines() + proc.stdout.splitlines())
    rows = json.loads(out.read_text())
    assert [r["program"] for r in rows] == ["score_step", "score_text"]
    for r in rows:
        for key in ("program", "compiled", "fits", "bytes_per_chip", "hbm_bytes", "flops",
                    "estimated_seconds"):
            assert key in r
        assert r["fits"] is False and r["hbm_bytes"] == int(0.0001 * 2 ** 30)
    assert "| score_step | yes | NO |" in proc.stdout


def test_no_msa_compiles_the_same_program_and_says_so(root, base, tmp_path):
    """--no_msa (libtpu without memory-space assignment, a process-wide flag): the same FLOPs;
    rows say so. On this small program, whose temporaries VMEM holds in large part with MSA,
    HBM temporaries rise without it; on full-size ones they may fall (SD1.5's v5e-8
    micro-step: 5.22 against 5.63 GiB): the no-MSA figure is near, not a bound."""
    out = tmp_path / "r.json"
    env = dict(os.environ, LIBTPU_INIT_ARGS="")
    proc = subprocess.run(
        [sys.executable, "-m", "fifa_jax.aot", "--config",
         os.path.join(root, "tiny_config.py") + ":" + root, "--topology", TOPOLOGY,
         "--programs", "train_step", "--no_msa", "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "no memory-space assignment" in proc.stdout
    (row,) = json.loads(out.read_text())
    full = base["train_step"]
    assert row["msa"] is False and full["msa"] is True
    assert row["flops"] == pytest.approx(full["flops"], rel=0.02)
    assert row["temp_bytes"] >= full["temp_bytes"]


@pytest.mark.parametrize("layout,latent,text,pooled", [
    ("stable-diffusion-v1-5", 64, (77, 768), None),
    ("stable-diffusion-2-1", 96, (77, 1024), None),
    ("stable-diffusion-xl-base-1.0", 128, (77, 2048), 1280)])
def test_public_layouts_give_the_programs_their_shapes(tmp_path, layout, latent, text, pooled):
    """SD1.5, SD2.x and SDXL from config files alone: the train step's and the sampler's
    abstract arguments (nothing compiled here: the full-size compiles are the CLI's)."""
    from fifa_jax.aot import programs
    from fifa_jax.evaluation import stage as eval_stage
    from fifa_jax.training import encode, train
    layouts.write(str(tmp_path), [layout])
    c = ml_collections.ConfigDict({"seed": 0, "stages": "train,evaluate",
                                   "mesh": parallel.default_config()})
    c.encode = encode.default_config()
    c.encode.base_model = str(tmp_path / layout)
    c.encode.resolution = latent * 8
    c.train = train.default_config()
    c.train.batch_size = 8
    c.train.grad_accum = 2
    c.evaluate = eval_stage.default_config()
    mesh = topology.mesh_over(topology.tpu_devices(TOPOLOGY), c.mesh)
    progs = {p.name: p for p in programs.stage_programs(c, mesh)}
    assert list(progs) == ["train_step", "eval_step", "sample", "vae_decode"]
    _, _, batch, consts = progs["train_step"].args
    assert batch["moments_w"].shape == (2, 8, 8, latent, latent)
    assert batch["prompt_embeds"].shape == (2, 8) + text
    assert ("pooled" in batch) == (pooled is not None)
    if pooled:
        assert batch["pooled"].shape == (2, 8, pooled) and consts["time_ids"].shape == (6,)
    noise = progs["sample"].args[1]
    assert noise.shape == (8, 4, latent, latent)


def test_train_advice_names_only_the_settings_left_to_change():
    from fifa_jax.aot.programs import train_advice
    full = train_advice(64, 2, 8, 8, "none", 1, "zero", "float32")
    for part in ("train.batch_size (64 pairs, 8 a chip)", "train.remat=nothing_saveable (now "
                 "none)", "mesh.fsdp (now 1, at most 8)", "param_tactic=fsdp", "ref_dtype"):
        assert part in full
    some = train_advice(8, 8, 8, 8, "nothing_saveable", 8, "zero", "bfloat16")
    assert some == "set mesh.param_tactic=fsdp to split the weights too (now zero)"
    none = train_advice(16, 4, 16, 16, "nothing_saveable", 16, "fsdp", "bfloat16")
    assert "at its lowest" in none and "more chips or more HBM" in none


def test_slice_names():
    assert topology.slice_name("v5e-16") == "v5e:4x4"
    assert topology.slice_name("v5p-8") == "v5p:2x2x1"
    assert topology.slice_name("v6e-8") == "v6e:2x4"
    assert topology.slice_name("v4-8") == "v4:2x2x1"
    assert topology.slice_name("v5e:2x2") == "v5e:2x2"
    with pytest.raises(topology.TopologyError, match="v5e-3"):
        topology.slice_name("v5e-3")


def test_v4_compiles_as_a_v4_vm_runs_it_megacore():
    # a v4-8 VM shows 4 devices (a chip each, two TensorCores); libtpu's default topology
    # would give 8 TensorCore devices of half the HBM
    devices = topology.tpu_devices("v4-8")
    assert len(devices) == 4
    assert {d.core_on_chip for d in devices} == {0}
    assert topology.hbm_bytes(devices[0]) == int(30.75 * topology.GIB)


@pytest.mark.parametrize("config_name,model,effective", [("pickapic_sd15.py", "sd15", 128),
                                                          ("pickapic_sdxl.py", "sdxl", 64)])
@pytest.mark.parametrize("target", ["v5e-8", "v5p-8", "v6e-8", "v4-8", "v5e-16", "v5e-256",
                                    "h100-8"])
def test_recipes_set_the_train_settings_for_a_target(config_name, model, effective, target):
    from fifa_jax import config_check
    from fifa_jax.aot import recipes
    path = os.path.join(REPO, "configs", config_name)
    if (model, target) == ("sdxl", "v4-8"):              # 4 chips: sized for 8
        with pytest.raises(ValueError, match="at least v4-16"):
            config_check.load_config_file(f"{path}:/models,greedy,{target}")
        target = "v4-16"
    config = config_check.load_config_file(f"{path}:/models,greedy,{target}")
    from fifa_jax import pipeline
    pipeline.validate(config)
    r = recipes.recipe(model, target)
    assert config.select.method == "greedy"               # the other words still reach it
    assert config.encode.base_model.startswith("/models/")
    assert (config.train.batch_size, config.train.grad_accum) == (r.batch_size, r.grad_accum)
    assert config.train.batch_size % r.devices == 0        # whole pairs on every chip
    assert r.devices % config.mesh.fsdp == 0
    assert (config.mesh.param_tactic, config.train.accumulate) == (r.param_tactic, "host")
    assert config.train.batch_size * config.train.grad_accum == max(effective,
                                                                   config.train.batch_size)
    assert config.train.learning_rate == pytest.approx(
        1e-8 * config.train.batch_size * config.train.grad_accum)
    plain = config_check.load_config_file(f"{path}:/models")
    assert plain.train.batch_size * plain.train.grad_accum == effective


def test_recipe_devices_follow_the_slice_names():
    from fifa_jax.aot import recipes
    assert recipes.recipe("sd15", "v5p-8").devices == 4     # v5p names count TensorCores
    assert recipes.recipe("sd15", "v5e-8").devices == 8
    assert recipes.recipe("sd15", "v4-8").devices == 4      # v4: megacore, a device a chip
    assert recipes.recipe("sdxl", "v5e-8").fsdp == 8
    with pytest.raises(ValueError, match="several targets"):
        recipes.split_arg("/r,v5e-8,v5p-8")
