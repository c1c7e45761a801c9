"""``taskserve-export diffusers`` on a 9-channel StableDiffusionInpaintPipeline folder: the
CLI writes four entries and its pipeline check (the server's loop over the exported parts
vs diffusers' pipeline) passes; the parts are tensor entries the server can load."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_cli_exports_an_inpainting_pipeline_and_validates_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("diffusers")
    from taskserve.exporters import cli
    from taskserve.exporters.tiny_diffusion import tiny_stable_diffusion
    from taskserve.server.repository.config import load_model_config
    from taskserve.server.tasks.readiness import check_options

    source = tiny_stable_diffusion(tmp_path / "inpaint-source", inpaint=True)
    repo = tmp_path / "repo"
    code = cli.main(["diffusers", "--model", str(source), "--out", str(repo), "--name", "sd-inpaint",
                     "--validation-steps", "2"])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    # The validation table: only inpainting runs on a 9-channel UNet.
    assert "max |pixel diff|" in err and "inpaint" in err and "MISMATCH" not in err
    assert sorted(p.name for p in repo.iterdir()) == [
        "sd-inpaint", "sd-inpaint-text-encoder", "sd-inpaint-vae-decoder", "sd-inpaint-vae-encoder",
    ]  # fmt: skip
    main = load_model_config(repo / "sd-inpaint")
    assert main.task == "image-generation" and main.task_options["unet_in_channels"] == 9
    check_options(repo / "sd-inpaint", main)  # what the exporter wrote passes the server's load check
    assert {t.name: t.padding for t in main.inputs or ()}["sample"] == "none"
    for part in ("text-encoder", "vae-decoder", "vae-encoder"):
        assert load_model_config(repo / f"sd-inpaint-{part}").task == "tensor"
    assert (repo / "sd-inpaint" / "tokenizer.json").is_file()
    assert (repo / "sd-inpaint" / "scheduler_config.json").is_file()


def test_cli_refuses_a_folder_that_is_no_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("diffusers")
    from taskserve.exporters import cli

    (tmp_path / "empty").mkdir()
    code = cli.main(["diffusers", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "repo"), "--name", "x"])
    assert code == 2
    assert "cannot load a diffusers pipeline" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "repo").iterdir() if not p.name.startswith(".")]
