"""The one streaming statistics pass over calibration data (`statistics`) and what it says
about each producer's channels: linear on the data, constant (`regimes`)."""
