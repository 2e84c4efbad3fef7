"""The demo oracle reads the world's pictures from pixels alone: each attribute and the harmful
mark right on fresh world images (at every aesthetic, blurred, JPEG-coded), prompts parsed in
every style, and the world's own true reward back on noise-free renders."""
import collections

import numpy as np
import pytest
from PIL import Image

from fifa_jax.demo import world as dw
from fifa_jax.demo import oracle

FIELDS = ("colour", "shape", "count", "position", "marked")
# floors: (min accuracy of each attribute and of the mark, max aesthetic MAE)
FLOORS = {"world": (0.95, 0.05), "a=0": (0.95, 0.08), "a=1": (1.0, 0.005),
          "blur1": (0.95, 0.06), "blur1 a=0": (0.9, 0.16), "jpeg90": (0.95, 0.08)}
SETTINGS = {"world": dict(n_images=300, seed=0), "a=0": dict(n_images=100, seed=1, aesthetic=0.0),
            "a=1": dict(n_images=100, seed=2, aesthetic=1.0),
            "blur1": dict(n_images=200, seed=3, blur=1.0),
            "blur1 a=0": dict(n_images=100, seed=4, blur=1.0, aesthetic=0.0),
            "jpeg90": dict(n_images=100, seed=5, jpeg=90)}


@pytest.fixture(scope="module")
def reports():
    return {k: oracle.accuracy_report(**v) for k, v in SETTINGS.items()}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_accuracy_floors(reports, name):
    rep, (floor, mae) = reports[name], FLOORS[name]
    assert rep["n"] == SETTINGS[name]["n_images"] and rep["n_harmful"] >= 0.2 * rep["n"]
    for k in FIELDS:
        assert rep["accuracy"][k] >= floor, (name, k, rep["accuracy"])
    assert rep["aesthetic_mae"] <= mae, (name, rep["aesthetic_mae"])
    assert rep["reward_corr"] >= 0.97, (name, rep["reward_corr"])


def test_world_images_per_aesthetic_band(reports):
    rep = reports["world"]
    assert rep["aesthetic_corr"] >= 0.98
    assert sum(b["n"] for b in rep["bands"].values()) == rep["n"]
    for band, acc in rep["bands"].items():
        if acc["n"] >= 10:
            assert min(acc[k] for k in FIELDS) >= 0.95, (band, acc)
    assert rep["bands"]["0.00-0.25"]["n"] >= 10       # the noisy end is seen too


def test_parse_prompt_every_style():
    prompts = dw.make_prompts(400, np.random.default_rng(0), 0.2)
    styles = collections.Counter(p["style"] for p in prompts)
    assert set(styles) == set(dw.STYLES) | {"harmful"}
    for p in prompts:
        got = oracle.parse_prompt(p["text"])
        assert got == {k: p[k] for k in ("colour", "shape", "count", "position", "harmful")}, p
    assert oracle.parse_prompt("two red circles in the centre with a weapon") == dict(
        colour="red", shape="circle", count=2, position="center", harmful=True)
    with pytest.raises(TypeError, match="prompt text"):
        oracle.parse_prompt(None)


def _world_images(n, seed, aesthetic=None):
    rng = np.random.default_rng(seed)
    prompts = dw.make_prompts(n, rng, 0.3)
    out = []
    for i, p in enumerate(prompts):
        im, scene = dw.make_image(p, list(dw.MODELS)[i % 3], 64, rng)
        if aesthetic is not None:
            scene = dict(scene, aesthetic=aesthetic)
            im = dw.render(scene, 64, rng)
        out.append((p, im, scene))
    return out


def test_true_reward_is_the_worlds_on_noise_free_renders():
    items = _world_images(60, 7, aesthetic=1.0)
    for p, im, s in items:
        world = dw.reward_of(s["colour_ok"], s["shape_ok"], s["count_ok"], s["position_ok"],
                             1.0, s["marked"])
        for prompt in (p["text"], p):                 # text or make_prompts dict
            r, det = oracle.true_reward(prompt, im)
            assert r == pytest.approx(world, abs=1e-9), (p, det)
    assert sum(s["marked"] for _, _, s in items) >= 5
    assert len({s["true_reward"] for _, _, s in items}) > 5


def test_true_reward_differs_only_by_the_aesthetic_error():
    prompts, ims, scenes = zip(*_world_images(60, 8))
    r, details = oracle.true_rewards(list(prompts), list(ims))
    world = np.array([s["true_reward"] for s in scenes])
    a_err = np.array([abs(d["measured"]["aesthetic"] - s["aesthetic"])
                      for d, s in zip(details, scenes)])
    np.testing.assert_allclose(np.abs(r - world), a_err, atol=1e-9)
    assert a_err.max() < 0.15
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        oracle.true_rewards(list(prompts[:2]), list(ims[:1]))


def test_the_mark_costs_reward_from_pixels_alone():
    scene = dict(colour="green", shape="square", count=2, position="bottom", aesthetic=1.0)
    clean = dw.render(scene, 64, np.random.default_rng(0))
    marked = dw.render(dict(scene, marked=True), 64, np.random.default_rng(0))
    r0, d0 = oracle.true_reward("two green squares at the bottom", clean)
    r1, d1 = oracle.true_reward("two green squares at the bottom", marked)
    assert r0 == pytest.approx(4.0) and r1 == pytest.approx(3.0)
    assert not d0["measured"]["marked"] and d1["measured"]["marked"]
    assert d1["measured"]["count"] == 2            # the X is not a shape
    # wrong attributes cost the world's weights; an unasked one counts as right
    r, d = oracle.true_reward("three red circles at the top", clean)
    assert r == pytest.approx(1.0) and not (d["colour_ok"] or d["shape_ok"] or d["count_ok"])
    assert oracle.true_reward("green squares", clean)[0] == pytest.approx(4.0)


def test_blank_and_bad_images():
    blank = np.full((64, 64, 3), 235, np.uint8)
    m = oracle.measure(blank)
    assert (m["count"], m["shape"], m["colour"], m["marked"], m["aesthetic"]) == \
        (0, None, None, False, 1.0)
    # nothing drawn: only the aesthetic and the unasked position count
    assert oracle.true_reward("one red circle", blank)[0] == pytest.approx(1.5)
    with pytest.raises(ValueError, match=r"uint8 \(S, S, 3\).*float32"):
        oracle.measure(blank.astype(np.float32))
    assert oracle.measure_batch(np.stack([blank, blank]))[1] == m
    assert oracle.measure(Image.fromarray(blank)) == m


def test_fixed_seed_fixed_numbers():
    a = oracle.accuracy_report(30, seed=11)
    assert a == oracle.accuracy_report(30, seed=11)
    b = oracle.accuracy_report(30, seed=12)
    assert a["aesthetic_mae"] != b["aesthetic_mae"]
    p, im, _ = _world_images(1, 13)[0]
    m = oracle.measure(im)
    assert (p["text"], m["colour"], m["shape"], m["count"], m["position"], m["marked"]) == PINNED
    assert m["noise_std"] == pytest.approx(PINNED_NOISE, abs=1e-6)


PINNED = ("orange diamond diamonds one centre centre 8k trending masterpiece!!", "yellow",
          "diamond", 3, "center", False)      # the generator drew three yellow diamonds
PINNED_NOISE = 33.29588002320827              # drawn with 60 (1 - 0.4505) = 32.97 (format 4)
