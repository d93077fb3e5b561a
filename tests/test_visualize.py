import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

import visualize_sparo
from dino_sparo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dino_sparo.errors import run_cli
from dino_sparo.eval.slot_stats import peakedness
from dino_sparo.models import ModelConfig, vit_tiny
from dino_sparo.viz.render import GAP, LABEL_HEIGHT, colormap

SPARO_CONFIG = dict(arch="vit_tiny", depth=2, readout="sparo", sparo_slots=4, sparo_slot_dim=8)


def tiny_sparo_model():
    """Slot 0 has a zero query (uniform attention), slot 1 a larger one (the most peaked), slots 2-3 are random."""
    torch.manual_seed(0)
    model = vit_tiny(depth=2, readout="sparo", sparo_slots=4, sparo_slot_dim=8).eval()
    with torch.no_grad():
        model.sparo.queries[0].zero_()
        model.sparo.queries[1].mul_(4.0)
    return model


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def tile_origin(row: int, column: int, tile_height: int, widths: list[int]) -> tuple[int, int]:
    """Top-left pixel (y, x) of the image part of a tile, below its label band."""
    top = GAP + row * (LABEL_HEIGHT + tile_height + GAP) + LABEL_HEIGHT
    left = GAP + sum(widths[:column]) + column * GAP
    return top, left


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz")
    model = tiny_sparo_model()
    backbone = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    args = ModelConfig.resolve(SPARO_CONFIG).flags()
    torch.save({"teacher": backbone, "student": backbone, "epoch": 3, "args": args}, root / "checkpoint.pth")
    # Official DINO backbone weights: a bare state dict with no saved args and no sparo.* tensors.
    dino = vit_tiny(depth=2, readout="cls")
    torch.save({f"module.{k}": v for k, v in dino.state_dict().items()}, root / "dino.pth")
    rng = np.random.default_rng(0)
    (root / "exact").mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(root / "exact" / "wide.png")
    (root / "mixed" / "nested").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / "mixed" / "a_wide.png")
    Image.fromarray(rng.integers(0, 256, (70, 40, 3), dtype=np.uint8)).save(root / "mixed" / "nested" / "b_tall.jpg")
    (root / "mixed" / "notes.txt").write_text("not an image, wrong extension")
    (root / "broken").mkdir()
    (root / "broken" / "broken.png").write_text("not a png")
    (root / "empty").mkdir()
    return root


def test_peakedness_against_hand_values():
    attention = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(peakedness(attention), torch.tensor([0.0, 1.0, 1 - math.log(2) / math.log(4)]))
    # Scale-free: attention mass left on the CLS token does not change the ranking over patches.
    torch.testing.assert_close(peakedness(attention * 0.3), peakedness(attention))


def test_colormap_luminance_rises():
    assert np.all(np.diff(luminance(colormap(np.linspace(0, 1, 101)))) > 0)


def test_slot_overlays_show_where_each_slot_attends(files, tmp_path):
    out = tmp_path / "viz"
    visualize_sparo.main(["--pretrained_weights", str(files / "checkpoint.pth"), "--images", str(files / "exact"),
                          "--slots", "0,2", "--image_size", "32", "48", "--tile_size", "64", "--alpha", "1",
                          "--output_dir", str(out), "--device", "cpu"])
    slots = np.asarray(Image.open(out / "slots.png").convert("RGB"))
    assert slots.shape[:2] == (2 * (LABEL_HEIGHT + 64) + 3 * GAP, 96 + 2 * GAP)

    # Independent forward pass on the same (already patch-aligned) image.
    pixels = Image.open(files / "exact" / "wide.png").convert("RGB")
    tensor = TF.normalize(TF.to_tensor(pixels), IMAGENET_MEAN, IMAGENET_STD)
    attention = tiny_sparo_model().get_slot_attention(tensor[None])[0].detach()
    patches = attention[2, 1:]  # 32x48 px, patch 16: 2 rows x 3 columns, row-major
    scaled = (patches - patches.min()) / (patches.max() - patches.min())

    top, left = tile_origin(0, 0, 64, [96])
    uniform = slots[top:top + 64, left:left + 96]
    assert (uniform == uniform[0, 0]).all()  # slot 0's attention is uniform: one colour
    top, left = tile_origin(1, 0, 64, [96])
    attending = slots[top:top + 64, left:left + 96]
    assert np.abs(attending.astype(int) - uniform.astype(int)).mean() > 20
    # Each 32-px block shows its own patch: brighter wherever the slot attends clearly more.
    brightness = [luminance(attending[32 * (i // 3) + 16, 32 * (i % 3) + 16]) for i in range(6)]
    pairs = [(i, j) for i in range(6) for j in range(6) if scaled[i] > scaled[j] + 0.02]
    assert len(pairs) >= 10 and all(brightness[i] > brightness[j] for i, j in pairs)

    summary = json.loads((out / "summary.json").read_text())
    assert [entry["slot"] for entry in summary["slots"]] == [0, 2]
    assert summary["slots"][1]["cls_weight"][0] == pytest.approx(attention[2, 0].item(), abs=1e-5)


def test_grid_size_for_non_square_images_and_top_slots(files, tmp_path):
    out = tmp_path / "viz"
    # --image_path: the flag name of DINO's visualize_attention.py
    visualize_sparo.main(["--pretrained_weights", str(files / "checkpoint.pth"), "--image_path",
                          str(files / "mixed"), "--top_slots", "3", "--image_size", "32", "--tile_size", "64",
                          "--output_dir", str(out), "--device", "cpu"])
    summary = json.loads((out / "summary.json").read_text())
    # Shorter side to 32, aspect kept, then each side cropped down to a multiple of 16.
    assert summary["input_sizes"] == [[32, 48], [48, 32]]
    assert [p.rsplit("/", 1)[-1] for p in summary["images"]] == ["a_wide.png", "b_tall.jpg"]
    widths = [96, round(64 * 32 / 48)]
    assert Image.open(out / "slots.png").size == (sum(widths) + 3 * GAP, 3 * (LABEL_HEIGHT + 64) + 4 * GAP)
    assert Image.open(out / "heads.png").size == (sum(widths) + 3 * GAP, 3 * (LABEL_HEIGHT + 64) + 4 * GAP)
    chosen = [entry["slot"] for entry in summary["slots"]]
    scores = [entry["peakedness"] for entry in summary["slots"]]
    assert chosen[0] == 1 and 0 not in chosen  # the large query is the most peaked, the zero query the least
    assert scores == sorted(scores, reverse=True)


def test_dino_checkpoint_without_args_draws_heads_only(files, tmp_path, capsys):
    out = tmp_path / "viz"
    visualize_sparo.main(["--pretrained_weights", str(files / "dino.pth"), "--images", str(files / "exact"),
                          "--image_size", "32", "48", "--tile_size", "32", "--output_dir", str(out),
                          "--device", "cpu"])
    assert "readout=cls" in capsys.readouterr().out
    assert not (out / "slots.png").exists()
    assert Image.open(out / "heads.png").size == (48 + 2 * GAP, 3 * (LABEL_HEIGHT + 32) + 4 * GAP)
    assert json.loads((out / "summary.json").read_text())["readout"] == "cls"


@pytest.mark.parametrize("case, extra, message", [
    ("empty", ["--images", "{root}/empty"], "no images found"),
    ("unreadable", ["--images", "{root}/broken"], "could be read"),
    ("slot range", ["--images", "{root}/exact", "--slots", "1,4"], "--slots 4 out of range"),
    ("cls model", ["--images", "{root}/exact", "--top_slots", "2", "--pretrained_weights", "{root}/dino.pth"],
     "no attention maps"),
    ("sparo flag, no sparo weights", ["--images", "{root}/exact", "--slots", "0", "--readout", "sparo",
                                      "--pretrained_weights", "{root}/dino.pth"], "missing sparo.*"),
])
def test_bad_inputs_give_one_line_error(files, tmp_path, capsys, case, extra, message):
    argv = ["--pretrained_weights", str(files / "checkpoint.pth"), "--image_size", "32",
            "--output_dir", str(tmp_path / "viz"), "--device", "cpu"]
    argv += [arg.format(root=files) for arg in extra]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: visualize_sparo.main(argv))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]
    assert not (tmp_path / "viz").exists()


def write_slot_matrix(path, accuracy):
    """A knn_slot_attributes.json as eval_knn.py --per_slot --attributes writes it (the keys --attribute reads)."""
    rows = [{"slot": slot, "top1": {"shape": value, "colour": 50.0}} for slot, value in accuracy.items()]
    path.write_text(json.dumps({"attributes": ["shape", "colour"], "slots": rows}))


def test_attribute_draws_the_slots_best_at_it(files, tmp_path, capsys):
    matrix = tmp_path / "matrix.json"
    write_slot_matrix(matrix, {0: 30.0, 1: 10.0, 2: 70.0, 3: 40.0})
    argv = ["--pretrained_weights", str(files / "checkpoint.pth"), "--images", str(files / "exact"),
            "--image_size", "32", "--tile_size", "64", "--device", "cpu", "--attribute", "shape"]
    summary = visualize_sparo.main([*argv, "--slot_matrix", str(matrix), "--top_slots", "2",
                                    "--output_dir", str(tmp_path / "viz")])
    assert [entry["slot"] for entry in summary["slots"]] == [2, 3]
    assert [entry["top1"] for entry in summary["slots"]] == [70.0, 40.0] and summary["attribute"] == "shape"
    assert Image.open(tmp_path / "viz" / "slots.png").size[1] == 2 * (LABEL_HEIGHT + 64) + 3 * GAP
    # default: the matrix beside the checkpoint, the 4 best slots
    write_slot_matrix(files / "knn_slot_attributes.json", {0: 30.0, 1: 10.0, 2: 70.0, 3: 40.0})
    try:
        summary = visualize_sparo.main([*argv, "--output_dir", str(tmp_path / "beside")])
    finally:
        (files / "knn_slot_attributes.json").unlink()
    assert [entry["slot"] for entry in summary["slots"]] == [2, 3, 0, 1]
    for extra, message in ((["--slot_matrix", str(tmp_path / "none.json")], "none.json not found"),
                           (["--slot_matrix", str(matrix), "--slots", "1"], "drop --slots"),
                           (["--slot_matrix", str(matrix), "--attribute", "size"], "--attribute size is not in")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda extra=extra: visualize_sparo.main([*argv, *extra, "--output_dir", str(tmp_path / "x")]))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err
    write_slot_matrix(matrix, {0: 30.0, 1: 10.0})
    with pytest.raises(SystemExit):
        run_cli(lambda: visualize_sparo.main([*argv, "--slot_matrix", str(matrix), "--output_dir",
                                              str(tmp_path / "y")]))
    assert "belongs to another checkpoint" in capsys.readouterr().err
