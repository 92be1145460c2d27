"""TensorFlow twins of the ops and the .tflite export (extra: export).

``tf_ops``  TensorFlow twins of ``refsd.ops`` (the second executor of the same model classes)
``build``   trace + convert each component, ``refsd_export.json`` (``refsd export``)
``lint``    our GPU-delegation lint (``refsd lint-gpu``)
``cli``     the two subcommands' parsers

Nothing here imports TensorFlow at import time except ``tf_ops``.
"""
