"""What annotations can teach: refused, with a message, when they cannot."""

import numpy as np
import pytest
import tifffile

from napari_jointattn import BadInputError
from napari_jointattn.engine.models.model import new_model
from napari_jointattn.engine.training import build_samples, train


def test_annotations_of_one_class_are_refused_everywhere(blobs, tmp_path, capsys):
    """Foreground everywhere it is annotated: any score would be perfect and mean nothing."""
    from napari_jointattn.cli import main
    from napari_jointattn.engine.training import annotation_summary

    image, labels = blobs
    model = new_model("nuclei")
    with pytest.raises(BadInputError, match="only one class"):
        build_samples(model, [image], [labels], masks=[labels > 0])
    with pytest.raises(BadInputError, match="only one class"):
        train(model, [image], [np.ones_like(labels)], epochs=1)
    summary = annotation_summary([np.ones_like(labels)], 2, model.classes)
    assert summary["warnings"] and "only one class" in summary["warnings"][0]
    assert annotation_summary([labels], 2, model.classes)["warnings"] == []
    tifffile.imwrite(tmp_path / "i.tif", image)
    tifffile.imwrite(tmp_path / "l.tif", np.full(labels.shape, 3, np.uint16))
    code = main(["train", "--image", str(tmp_path / "i.tif"), "--labels", str(tmp_path / "l.tif"),
                 "--from", "nuclei", "--out", str(tmp_path / "m.safetensors"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "only one class" in err and not (tmp_path / "m.safetensors").exists()
