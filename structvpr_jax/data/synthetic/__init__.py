"""A procedural 2.5-D city with exact per-pixel labels (the embedded default data).

Training runs on a fresh machine with no download: this package renders
street views of a procedural city with pure, vectorised numpy and writes them
in the project layout (`structvpr_jax.data.layout`; docs/design.md, "Synthetic
city"):

  world.py     the district: streets, blocks, buildings, traffic, poses and
               the per-place regimes (`make_world`, `make_scene`, `query_pose`)
  render.py    one view of a world under a condition, RGB + exact labels
               (`render`)
  labels.py    class names / colours and an imperfect segmenter
               (`corrupt_labels`, `colorize`)
  generate.py  the dataset writer, the montage and the CLI (`generate`,
               `montage`, `main`)

CLI::

    python -m structvpr_jax.data.synthetic generate --root DIR [--seed 0] \
        [--height 120 --width 160] [--train N --val N --test N]
    python -m structvpr_jax.data.synthetic montage --out docs/synthetic_montage.png

The public names are re-exported here. `synthetic.render` and
`synthetic.generate` are the functions, not the submodules (reach a submodule
with ``importlib.import_module("structvpr_jax.data.synthetic.render")``).
"""

from structvpr_jax.data.synthetic.generate import VERSION, generate, main, montage
from structvpr_jax.data.synthetic.labels import (
    CLASS_NAMES, NUM_CLASSES, PALETTE, colorize, corrupt_labels)
from structvpr_jax.data.synthetic.render import HFOV_DEG, MAX_LAYERS, render
from structvpr_jax.data.synthetic.world import (
    BICYCLE, BUILDING, BUS, CAMERA_HEIGHT, CAR, CONDITIONS, DATABASE_CONDITION, FENCE,
    MOTORCYCLE, PERSON, PLACE_SPACING, POLE, QUERY_CONDITIONS, REGIMES, RIDER, ROAD,
    SIDEWALK, SKY, SPLIT_INDEX, TERRAIN, TRAFFIC_LIGHT, TRAFFIC_SIGN, TRAIN, TRUCK,
    UTM_ORIGIN, UTM_ZONE, VEGETATION, VIEW_DISTANCE, WALL, Pose, Prims, Street, World,
    make_scene, make_world, query_pose)

__all__ = ["render", "corrupt_labels", "make_world", "make_scene", "query_pose", "generate",
           "montage", "colorize", "main", "World", "Street", "Pose", "Prims", "CONDITIONS",
           "DATABASE_CONDITION", "QUERY_CONDITIONS", "REGIMES", "PALETTE", "CLASS_NAMES",
           "NUM_CLASSES", "PLACE_SPACING", "CAMERA_HEIGHT", "VIEW_DISTANCE", "HFOV_DEG",
           "MAX_LAYERS", "SPLIT_INDEX", "UTM_ORIGIN", "UTM_ZONE", "VERSION",
           "ROAD", "SIDEWALK", "BUILDING", "WALL", "FENCE", "POLE", "TRAFFIC_LIGHT",
           "TRAFFIC_SIGN", "VEGETATION", "TERRAIN", "SKY", "PERSON", "RIDER", "CAR", "TRUCK",
           "BUS", "TRAIN", "MOTORCYCLE", "BICYCLE"]
