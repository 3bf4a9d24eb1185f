"""The docks' controllers without Qt: on a napari ViewerModel, no window."""


import numpy as np
import pytest

from napari_jointattn.engine.errors import BadInputError
from napari_jointattn.engine.models.model import new_model, save_model

napari = pytest.importorskip("napari")


@pytest.fixture
def viewer():
    from napari.components import ViewerModel

    return ViewerModel()


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
    # the heatmaps sit between the image and its labels: the labels stay on top, drawn and listed
    assert names[0] == "cells" and names[-1] == "cells labels"
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


@pytest.fixture
def small_model(tmp_path):
    """One joint module (1/16): three maps (pointwise, mix, effect); quick to run."""
    from napari_jointattn.model import DenseUNetConfig

    model = new_model("nuclei", config=DenseUNetConfig(attention_levels=(2,)), seed=0)
    return str(save_model(model, tmp_path / "small.safetensors"))


def test_attention_layers_are_found_by_their_key_not_their_name(viewer, small_model, blobs):
    from napari_jointattn.controllers.layers import attention_key
    from napari_jointattn.controllers.segment import SegmentController
    from napari_jointattn.model import AttentionKey

    image, _ = blobs
    viewer.add_image(image, name="cells")
    lookalike = viewer.add_image(np.full(image.shape, 7.0, np.float32), name="attention joint 1/16")
    ctl = SegmentController(viewer)
    # the user's layer is an image like any other
    assert [l.name for l in ctl.image_layers()] == ["cells", "attention joint 1/16"]
    request = ctl.make_request("cells", small_model, attention=True, tile=128)
    ctl.apply(request, ctl.run(request))
    mix_key = AttentionKey("joint", 16, "mix")
    mix = next(l for l in viewer.layers if attention_key(l) == mix_key)
    assert mix.name == "attention joint 1/16 mix"
    pointwise = viewer.layers["attention joint 1/16 [1]"]  # the name was taken
    assert attention_key(pointwise) == AttentionKey("joint", 16, "pointwise")
    mix.name = "what the module mixes"
    mix.data = np.zeros_like(mix.data)
    n_layers = len(viewer.layers)
    request = ctl.make_request("cells", small_model, attention=True, tile=128)
    ctl.apply(request, ctl.run(request))
    assert len(viewer.layers) == n_layers  # every map replaced in its layer, renamed or not
    assert mix.name == "what the module mixes" and mix.data.max() > 0
    # the layer that only has an attention map's name is never touched
    assert (lookalike.data == 7.0).all() and "jointattn_attention" not in lookalike.metadata
    assert ctl.image_layers() == [viewer.layers["cells"], lookalike]


def test_cancel_between_request_and_worker_start_cancels(viewer, small_model, blobs):
    """Cancel clicked while the worker still waits for a thread: the run is cancelled."""
    from napari_jointattn.controllers.segment import SegmentController

    viewer.add_image(blobs[0], name="cells")
    ctl = SegmentController(viewer)
    request = ctl.make_request("cells", small_model, tile=128)
    ctl.cancel_event.set()
    assert ctl.run_and_prepare(request) is None
    assert "cells labels" not in viewer.layers
    request = ctl.make_request("cells", small_model, tile=128)  # a new request forgets that Cancel
    assert ctl.run(request).labels.shape == blobs[0].shape


def test_query_uses_only_what_the_click_snapshotted(viewer, small_model, blobs):
    """The layer list changes between the click and the worker: the worker's result is the
    clicked layer's, read from the snapshot (the worker never looks at the viewer)."""
    from napari_jointattn.controllers.segment import SegmentController
    from napari_jointattn.engine.inference.query import AttentionQuery

    image, _ = blobs
    viewer.add_image(image, name="cells")
    ctl = SegmentController(viewer)
    request = ctl.query_request("cells", small_model, (20, 30), tile=64)
    viewer.layers.remove("cells")
    viewer.add_image(np.zeros((40, 50), np.float32), name="cells")
    result, inp = ctl.query(request)
    expected = AttentionQuery(ctl.model(small_model), image, tile=64).query((20, 30))
    np.testing.assert_array_equal(result.heatmap, expected.heatmap)
    assert inp.spatial_shape == image.shape and result.origin == expected.origin


def test_requests_of_a_dask_layer_read_no_pixels(viewer, small_model, blobs):
    """Making a Segment or query request (GUI thread) reads no pixels of a lazy layer; the
    worker reads them, and segments them as it would the array itself."""
    da = pytest.importorskip("dask.array")
    from napari_jointattn.controllers.segment import SegmentController

    image, _ = blobs
    reads = []
    lazy = da.from_array(image, chunks=(48, 60)).map_blocks(lambda b: reads.append(b.shape) or b,
                                                              dtype=image.dtype)
    viewer.add_image(lazy, name="lazy", contrast_limits=(0, 250))
    viewer.add_image(image, name="plain")
    ctl = SegmentController(viewer)
    reads.clear()
    request = ctl.make_request("lazy", small_model, tile=128)
    ctl.query_request("lazy", small_model, (20, 30), tile=64)
    assert reads == []
    labels = ctl.run(request).labels
    assert reads  # read in the worker
    plain = ctl.run(ctl.make_request("plain", small_model, tile=128)).labels
    np.testing.assert_array_equal(labels, plain)


def test_session_keeps_the_current_model_and_a_few_others(tmp_path):
    from napari_jointattn.controllers.session import KEPT_MODELS, Session
    from napari_jointattn.engine.inference import placement
    from napari_jointattn.model import DenseUNetConfig

    config = DenseUNetConfig(stem_channels=8, growth=4, block_layers=(1, 1),
                             decoder_channels=(8, 8, 8), head_channels=4, attention_dim=8,
                             attention_levels=(1,))
    paths = [str(save_model(new_model(config=config, classes=["background", "x"], seed=i),
                            tmp_path / f"m{i}.safetensors")) for i in range(KEPT_MODELS + 3)]
    session = Session()
    session.set_model(paths[0])
    current = session.model(paths[0])
    first_other = session.model(paths[1])
    first_other.net.train()  # a network in training mode is run through a copy
    placement.inference_network(first_other.net, "cpu")
    assert "cpu" in placement._COPIES[first_other.net]
    for path in paths[2:]:
        session.model(path)
    assert set(session._cache) == {paths[0], *paths[-KEPT_MODELS:]}
    assert session.model(paths[0]) is current  # never dropped while current
    assert placement._COPIES.get(first_other.net, {}) == {}  # its copies dropped with it
    assert session.model(paths[1]) is not first_other  # loaded again when asked for
    assert len(session._cache) == KEPT_MODELS + 1


def test_fine_tune_offers_user_images_whatever_their_name(viewer):
    from napari_jointattn.controllers.finetune import FinetuneController
    from napari_jointattn.controllers.layers import ATTENTION_KEY
    from napari_jointattn.model import AttentionKey

    viewer.add_image(np.zeros((8, 8), np.float32), name="attention scan")  # the user's own image
    made = viewer.add_image(np.zeros((8, 8), np.float32), name="heat")
    made.metadata[ATTENTION_KEY] = AttentionKey("joint", 16, "mix")  # a map the Segment dock made
    assert FinetuneController(viewer).image_names() == ["attention scan"]
