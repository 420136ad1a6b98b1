"""Dataset reading, bad-input errors, and the deterministic per-step training data."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from workbench.data.dataset import DataError, EvalDataset, SegDataset, StepDataset, StepPlan, load_manifest
from workbench.data.transforms import cutmix_box, normalize, weak_transform


@pytest.fixture
def data_copy(tmp_path, tiny_data):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    return root


def first_line(root, split):
    return (root / "splits" / f"{split}.txt").read_text().splitlines()[0].split()


def test_missing_image_is_named(data_copy):
    img, _ = first_line(data_copy, "labeled_1-4")
    (data_copy / img).unlink()
    with pytest.raises(DataError, match=img.split("/")[-1]):
        SegDataset(data_copy, "labeled_1-4")


def test_bad_mask_values_named(data_copy):
    _, mask = first_line(data_copy, "labeled_1-4")
    arr = np.array(Image.open(data_copy / mask))
    arr[0, 0] = 17
    im = Image.fromarray(arr, mode="P")
    im.putpalette(Image.open(data_copy / mask).getpalette())
    im.save(data_copy / mask)
    ds = SegDataset(data_copy, "labeled_1-4")
    with pytest.raises(DataError, match=r"values \[17\]") as e:
        ds.load(0)
    assert mask.split("/")[-1] in str(e.value)


def test_size_mismatch_named(data_copy):
    img, mask = first_line(data_copy, "labeled_1-4")
    Image.open(data_copy / img).resize((20, 20)).save(data_copy / img)
    with pytest.raises(DataError, match="size mismatch") as e:
        SegDataset(data_copy, "labeled_1-4").load(0)
    assert img.split("/")[-1] in str(e.value) and mask.split("/")[-1] in str(e.value)


def test_unreadable_image_named(data_copy):
    img, _ = first_line(data_copy, "labeled_1-4")
    (data_copy / img).write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="cannot read image") as e:
        SegDataset(data_copy, "labeled_1-4").load(0)
    assert img.split("/")[-1] in str(e.value)


def test_missing_split_and_manifest(tmp_path, data_copy):
    with pytest.raises(DataError, match="no split 'labeled_1-2'"):
        SegDataset(data_copy, "labeled_1-2")
    with pytest.raises(DataError, match="manifest.json not found"):
        load_manifest(tmp_path / "empty")


def test_eval_dataset_long_masks(tiny_data):
    img, mask = EvalDataset(tiny_data, "val")[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and mask.dtype == torch.long


def make_steps(root, world=1, rank=0, batch=4, semi=True, accum=1, seed=0):
    lab, unl = SegDataset(root, "labeled_1-4"), SegDataset(root, "unlabeled_1-4")
    plan = StepPlan(len(lab), len(unl), batch, batch, world, rank, seed, semi, accum)
    ds = StepDataset(lab, unl if semi else None, plan, 32)
    ds.total_steps = 100
    return ds


def test_step_batch_keys_and_determinism(tiny_data):
    ds = make_steps(tiny_data)
    a, b = ds[3], ds[3]
    for key in ("x_l", "y_l", "x_w", "x_s1", "x_s2", "ignore", "box1", "box2", "x_w_mix", "ignore_mix", "y_u"):
        assert torch.equal(a[key], b[key]), key
    assert a["x_l"].shape == (4, 3, 32, 32) and a["x_l"].dtype == torch.uint8
    assert a["box1"].dtype == torch.bool and a["y_l"].shape == (4, 32, 32)
    assert not torch.equal(ds[4]["x_w"], a["x_w"])


def test_mix_batch_is_the_main_batch_images_by_default(tiny_data):
    # the reference zips the unlabeled loader with itself: position i of the mix batch is the same image as position
    # i of the main batch, in another augmentation
    ds = make_steps(tiny_data)
    assert ds.mix_source == "same_images"
    for step in (0, 3, 7, 8):   # 30 unlabeled / 4 = 7 steps per epoch: steps 7 and 8 are in the second epoch
        b = ds[step]
        assert b["ids_mix"] == b["ids_u"], step
        assert not torch.equal(b["x_w_mix"], b["x_w"]) and not torch.equal(b["x_s1_mix"], b["x_s1"]), step
    lab, unl = SegDataset(tiny_data, "labeled_1-4"), SegDataset(tiny_data, "unlabeled_1-4")
    plan = StepPlan(len(lab), len(unl), 4, 4, 1, 0, 0, True)
    ind = StepDataset(lab, unl, plan, 32, mix_source="independent")
    ind.total_steps = 100
    assert any(ind[s]["ids_mix"] != ind[s]["ids_u"] for s in range(4))
    # the main stream is the same under both settings (only the mix stream's order changes)
    assert ind[3]["ids_u"] == ds[3]["ids_u"] and torch.equal(ind[3]["x_w"], ds[3]["x_w"])
    with pytest.raises(ValueError, match="mix_source"):
        StepDataset(lab, unl, plan, 32, mix_source="other")


def test_global_batch_split_over_processes_or_accumulation(tiny_data):
    """World 2 x batch 2 and accumulation 2 x batch 2 see exactly the samples of one process with batch 4."""
    one = make_steps(tiny_data, batch=4)[5]
    r0, r1 = make_steps(tiny_data, 2, 0, batch=2)[5], make_steps(tiny_data, 2, 1, batch=2)[5]
    acc = make_steps(tiny_data, batch=2, accum=2)
    a0, a1 = acc[10], acc[11]  # optimiser step 5 = micro-steps 10 and 11
    for key in ("x_l", "y_l", "x_w", "x_s1", "box1", "x_w_mix"):
        assert torch.equal(torch.cat([r0[key], r1[key]]), one[key]), key
        assert torch.equal(torch.cat([a0[key], a1[key]]), one[key]), key


def test_labeled_set_repeated_evenly(tiny_data):
    ds = make_steps(tiny_data, batch=2)
    ipe = ds.plan.iters_per_epoch  # 30 unlabeled / 2 = 15 steps
    assert ipe == 15
    ids = [i for s in range(ipe) for i in ds[s]["ids_l"]]
    counts = {i: ids.count(i) for i in set(ids)}
    assert len(counts) == 10 and set(counts.values()) == {3}   # 30 slots over 10 labeled images


def test_weak_transform_pads_with_ignore():
    torch.manual_seed(0)
    t = weak_transform(32, scale_range=(0.5, 0.5), flip=False)
    img = tv_tensors.Image(torch.full((3, 32, 32), 200, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.ones(32, 32, dtype=torch.uint8))
    i2, m2 = t(img, mask)
    assert i2.shape == (3, 32, 32)
    pad = m2 == 255
    assert pad.sum() == 32 * 32 - 16 * 16           # the 16x16 rescaled image, the rest padding
    assert (i2[:, pad] == 0).all() and (i2[:, ~pad] == 200).all()


def test_cutmix_box_geometry():
    g = torch.Generator().manual_seed(0)
    assert not cutmix_box(32, p=0.0, generator=g).any()
    for _ in range(50):
        b = cutmix_box((32, 40), p=1.0, generator=g)
        ys, xs = b.nonzero(as_tuple=True)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert b.sum() == h * w                                   # a filled rectangle
        assert 1 <= b.sum() <= 0.4 * 32 * 40 + 1


def test_normalize_rejects_float():
    with pytest.raises(TypeError):
        normalize(torch.zeros(1, 3, 2, 2), (0.5,) * 3, (0.5,) * 3)
    x = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    assert torch.allclose(normalize(x, (0.5,) * 3, (0.25,) * 3), torch.full((1, 3, 1, 1), 2.0))
