"""avfuse: give video action recognition an audio stream.

Stages (each a public function taking one frozen config dataclass):

* :func:`avfuse.manifest.scan`      dataset tree or Kinetics CSV -> manifest
* :func:`avfuse.extract.extract`    videos -> mono FLAC sound tracks
* :func:`avfuse.features.compute_features`  audio -> log-mel feature store
* :func:`avfuse.train.train`        feature store -> audio classifier
* :func:`avfuse.predict.predict`    classifier -> per-video score file
* :func:`avfuse.evaluate.evaluate`  score file + manifest -> metrics
* :func:`avfuse.fuse.fuse`          audio + video score files -> fused scores and report
* :func:`avfuse.pipeline.run`       all of the above from one config
"""

__version__ = "0.1.0"
