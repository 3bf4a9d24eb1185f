"""The docks' controllers without Qt: on a napari ViewerModel, no window."""

import subprocess
import sys

import numpy as np
import pytest

from napari_jointattn.engine.errors import BadInputError
from napari_jointattn.engine.models.model import new_model, save_model

napari = pytest.importorskip("napari")


@pytest.fixture
def viewer():
    from napari.components import ViewerModel

    return ViewerModel()


def test_controllers_import_no_qt():
    code = ("import sys; import napari_jointattn.controllers.segment, napari_jointattn.controllers.finetune, "
            "napari_jointattn.controllers.session; "
            "bad = [m for m in ('qtpy', 'PyQt6', 'PyQt5', 'PySide6') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_segment_on_a_viewer_model(viewer, saved_model, blobs):
    from napari_jointattn.controllers.segment import SegmentController

    image, _ = blobs
    viewer.add_image(image, name="cells", scale=(0.5, 0.5))
    ctl = SegmentController(viewer)
    request = ctl.make_request("cells", str(saved_model), attention=True, tile=128)
    _result, steps = ctl.run_and_prepare(request)
    assert [l.name for l in viewer.layers] == ["cells"]  # nothing touched before the steps run
    for step in steps:
        step.run()
    labels = viewer.layers["cells labels"]
    assert labels.data.dtype == np.int32 and labels.data.shape == image.shape
    assert tuple(labels.scale) == (0.5, 0.5)
    names = [l.name for l in viewer.layers]
    assert len([n for n in names if n.startswith("attention joint")]) == 9
    assert not viewer.layers["attention joint 1/8 mix"].visible
    effect = viewer.layers["attention joint 1/8 effect"]  # what the module changed: hidden, own scale
    assert not effect.visible and effect.colormap.name == "plasma"
    labels.paint((10, 10), 256)  # ids beyond 255 can be painted
    assert labels.data[10, 10] == 256


def test_input_removed_before_the_layers_are_added(viewer, saved_model, blobs):
    from napari_jointattn.controllers.segment import SegmentController

    viewer.add_image(blobs[0], name="cells")
    ctl = SegmentController(viewer)
    _result, steps = ctl.run_and_prepare(ctl.make_request("cells", str(saved_model), tile=128))
    viewer.layers.remove("cells")
    with pytest.raises(BadInputError, match="removed"):
        steps[0].run()
    assert len(viewer.layers) == 0


def test_attention_maps_of_big_images_are_downsampled_in_place():
    from napari_jointattn.controllers.segment import attention_factor, downsample

    assert attention_factor((2048, 1000)) == 1
    assert attention_factor((4096, 4096)) == 4
    assert attention_factor((3, 8192, 100)) == 8
    data = np.arange(4100 * 8, dtype=np.float32).reshape(8, 4100)
    small, scale, translate = downsample(data, (2.0, 0.5), (10.0, 3.0), 4)
    assert small.shape == (2, 1025) and small.flags.c_contiguous
    # every kept pixel sits at the world position it had: translate + index * scale
    for j, i in ((0, 0), (1, 1024), (1, 7)):
        y, x = 2 + 4 * j, 2 + 4 * i
        assert small[j, i] == data[y, x]
        assert translate[0] + j * scale[0] == 10.0 + y * 2.0
        assert translate[1] + i * scale[1] == 3.0 + x * 0.5


def test_rollback_changes_the_next_segment_without_a_segment_dock(viewer, model_dir, blobs):
    from napari_jointattn.controllers.finetune import CURRENT, FinetuneController
    from napari_jointattn.controllers.segment import SegmentController

    viewer.add_image(blobs[0], name="cells")
    ft = FinetuneController(viewer)
    assert ft.resolve_start(CURRENT) == "nuclei"  # no Segment model chosen: the first preset
    older = save_model(new_model("nuclei", seed=1, provenance={"parent": "nuclei"}),
                       model_dir / "nuclei-ft-older.safetensors")
    assert [p for p, _ in ft.versions()] == [older]
    ft.use_version(older)
    # a Segment controller made afterwards (a dock opened later) uses it, and so does fine-tuning
    assert SegmentController(viewer).make_request("cells").model_key == str(older)
    assert ft.resolve_start(CURRENT) == str(older)
    with pytest.raises(BadInputError, match="no longer exists"):
        ft.use_version(model_dir / "gone.safetensors")


def test_fine_tune_pairs_any_labels_layer_of_the_image_size(viewer, blobs):
    from napari_jointattn.controllers.finetune import FinetuneController

    image, truth = blobs
    viewer.add_image(image, name="cells")
    viewer.add_labels(np.zeros(truth.shape, np.int32), name="new")
    viewer.add_labels(np.zeros((5, 5), np.int32), name="tiny")
    viewer.add_labels(truth, name="cells labels")
    ft = FinetuneController(viewer)
    assert ft.labels_names("cells") == ["new", "cells labels"]
    assert ft.candidate_pairs() == [("cells", "cells labels")]
    summary = ft.summary([("cells", "new"), ("cells", "cells labels")], None)
    assert summary["images"] == 1 and summary["pixels_per_class"]["nucleus"] == int((truth > 0).sum())
    assert "Add pair" in ft.summary([], None)["warnings"][0]


def test_correction_weights_come_from_the_segment_prediction(viewer, blobs):
    from napari_jointattn.controllers.finetune import FinetuneController
    from napari_jointattn.controllers.segment import PREDICTION_KEY

    image, truth = blobs
    viewer.add_image(image, name="cells")
    layer = viewer.add_labels(truth.astype(np.int32), name="cells labels")
    prediction = truth.copy()
    prediction[:10, :10] = 7  # the model saw an object the user erased
    layer.metadata[PREDICTION_KEY] = prediction
    ft = FinetuneController(viewer)
    req = ft.make_request(ft.candidate_pairs(), None, {}, weight_corrections=4.0)
    w = req.weights[0]
    assert w[:10, :10].min() == 5.0 and (w[10:] == 1.0).all()
    assert ft.make_request(ft.candidate_pairs(), None, {}).weights is None
    assert req.out.name.startswith("nuclei-ft-") and req.labels[0] is not layer.data  # a snapshot


def test_settled_objects_skip_collections_until_thawed():
    """gc_hold: objects that exist at settle() are not walked (a cycle among them survives a
    collection) until thaw() gives them back (then the cycle is freed)."""
    import gc
    import weakref

    from napari_jointattn.controllers import gc_hold

    class Node:
        pass

    gc_hold.thaw()
    assert gc_hold.kept() == 0
    a, b = Node(), Node()
    a.other, b.other = b, a  # a reference cycle: only a full walk frees it
    alive = weakref.ref(a)
    gc_hold.settle()
    try:
        assert gc_hold.kept() > 1000
        del a, b
        gc.collect()
        assert alive() is not None  # kept out of the walk
    finally:
        gc_hold.thaw()
    assert gc_hold.kept() == 0
    gc.collect()
    assert alive() is None
