"""Files in and out: loading models safely (`load`), writing them atomically in every format
(`save`), verified exports (`export`), the input kinds `prune` reads (`inputs`) with the
tf_keras child and the plain-SavedModel reader, archives and their declared weights, and
calibration data (`data`)."""
