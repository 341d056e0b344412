"""The one graph: layers over tensors whose channels belong to groups (`graph`), what each
Keras layer class means (`registry`), reading a Keras model (`read`) and building one (`build`)."""
