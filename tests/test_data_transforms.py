"""User transforms (`data.transforms`): built from class paths, applied per sample and per client, seeded per client."""

from __future__ import annotations

import pytest
import torch
import yaml
from torchvision.transforms import v2

from sparsyfed_lightning.data.loaders import StackedBatchLoader
from sparsyfed_lightning.data.module import FederatedDataModule
from sparsyfed_lightning.data.transforms import build_transforms

ROTATE = {"class_path": "torchvision.transforms.v2.RandomRotation", "init_args": {"degrees": 40, "fill": -1.0}}


def _digits(tmp_path, **kwargs) -> FederatedDataModule:
    dm = FederatedDataModule("digits", num_clients=4, batch_size=16, cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup()
    return dm


def test_class_paths_and_objects_build_the_same_transforms():
    built = build_transforms([ROTATE, "torchvision.transforms.v2.RandomHorizontalFlip", v2.GaussianNoise(0.1)])
    assert isinstance(built[0], v2.RandomRotation) and built[0].degrees == [-40.0, 40.0]
    assert isinstance(built[1], v2.RandomHorizontalFlip) and isinstance(built[2], v2.GaussianNoise)
    assert build_transforms(None) == []


@pytest.mark.parametrize(
    ("transforms", "expected"),
    [
        ([{"class_path": "torchvision.transforms.v2.RandomRotate"}], "data.transforms[0]='torchvision.transforms.v2."
         "RandomRotate' does not resolve to an importable object; allowed: a transform object"),
        ([ROTATE, {"class_path": "torchvision.transforms.v2.RandomRotation", "init_args": {"degree": 3}}],
         "data.transforms[1]='torchvision.transforms.v2.RandomRotation' cannot be built with init_args {'degree': 3}"),
        (["math.pi"], "data.transforms[0]='math.pi' names a float, not a class or function"),
        ([{"class_path": "torchvision.transforms.v2.RandomRotation", "args": {}}], "data.transforms[0]={'class_path'"),
        ([3], "data.transforms[0]=3 is not callable on a sample"),
        (ROTATE, "data.transforms={'class_path'"),
    ],
)
def test_bad_transforms_are_one_line_errors_before_any_data_is_read(transforms, expected, tmp_path):
    with pytest.raises(ValueError) as error:
        FederatedDataModule("digits", transforms=transforms, cache_dir=str(tmp_path))
    assert str(error.value).startswith(expected) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "partitions").exists()


def test_transforms_that_fail_or_change_the_shape_are_one_line_errors(tmp_path):
    crop = {"class_path": "torchvision.transforms.v2.CenterCrop", "init_args": {"size": 4}}
    with pytest.raises(ValueError, match=r"^data.transforms change a training sample's shape from \(1, 8, 8\) to "):
        _digits(tmp_path, transforms=[crop])
    with pytest.raises(ValueError, match=r"^data.transforms fail on a training sample of shape \(1, 8, 8\): "):
        _digits(tmp_path, transforms=[lambda sample: sample.view(-1, 3)])


def test_each_sample_and_each_client_draws_its_own_transform_alone_or_stacked(tmp_path):
    dm = _digits(tmp_path, transforms=[ROTATE])
    plain = _digits(tmp_path)
    seeds = [11, 12, 13]
    alone = []
    for cid, seed in enumerate(seeds):
        torch.manual_seed(seed)  # what seed_everything does before a client trains alone
        alone.append(list(dm.client_train_dataloader(cid, seed=seed)))
    untransformed = list(plain.client_train_dataloader(0, seed=seeds[0]))
    assert not torch.equal(alone[0][0][0], untransformed[0][0])  # the rotation did something ...
    assert torch.equal(alone[0][0][1], untransformed[0][1])  # ... to the same samples, in the same order
    torch.manual_seed(0)
    loaders = [dm.client_train_dataloader(cid, seed=seed) for cid, seed in enumerate(seeds)]
    before = torch.get_rng_state()
    stacked = list(StackedBatchLoader(loaders, seeds))
    assert torch.equal(torch.get_rng_state(), before)
    for step, (xs, ys) in enumerate(stacked):
        for i in range(3):
            assert torch.equal(xs[:, i : i + 1], alone[i][step][0]) and torch.equal(ys[:, i], alone[i][step][1])
    same = torch.zeros(16, 1, 8, 8)
    same[:, :, :, :4] = 1.0  # an asymmetric image, sixteen times
    out = dm._transform(same)
    # One draw per sample (a v2 transform called on the batch would rotate all sixteen alike).
    assert len({tuple(sample.flatten().tolist()) for sample in out}) >= 4


def test_a_round_with_transforms_is_the_same_stacked_or_alone(tmp_path):
    from sparsyfed_lightning import ClientModule, Dense, FederatedTrainer

    dm = _digits(tmp_path, transforms=[ROTATE])
    states = []
    for stack in (1, 4):
        model = ClientModule("small_cnn", 10, lr=0.05, backbone_kwargs={"width": 4})
        trainer = FederatedTrainer(method=Dense(), rounds=1, clients_per_round=4, accelerator="cpu",
                                   progress="none", stack_clients=stack)
        trainer.fit(model, datamodule=dm)
        states.append(trainer.global_state)
    assert trainer.history[-1]["stacked_clients"] == 4
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_transforms_from_yaml_through_the_cli(tmp_path, capsys):
    from sparsyfed_lightning.cli import main

    config = tmp_path / "transforms.yaml"
    config.write_text(yaml.safe_dump({"data": {"transforms": [ROTATE]}}))
    assert main(["fit", "--config", str(config), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["transforms"] == [ROTATE]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"transforms": [{"class_path": "torchvision.transforms.v2.Nope"}]}}))
    assert main(["fit", "--config", str(bad), "--trainer.run_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsyfed: error: data.transforms[0]='torchvision.transforms.v2.Nope' does not resolve")
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()
