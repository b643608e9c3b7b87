"""Input operations: pure tf functions of explicit arguments (crops, geometry, intensity, style choice
and blending, patches, evaluation tiles), tested eagerly and inside ``tf.data.Dataset.map``."""
