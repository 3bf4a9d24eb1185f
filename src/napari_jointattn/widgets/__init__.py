"""The napari front: thin Qt docks on the engine."""
