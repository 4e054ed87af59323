"""Base configuration shared by every config file (big_vision style).

Command: imported by the other configs; not run on its own.
`get_config(arg)` accepts "smoke" (tiny data/model/steps for tests and CI).
"""

import ml_collections


def parse_arg(arg):
  """'smoke' or 'smoke,foo' -> {"smoke": True, "foo": True}."""
  flags = [a for a in (arg or "").split(",") if a]
  return {f: True for f in flags}


def get_config(arg=None):
  args = parse_arg(arg)
  smoke = args.get("smoke", False)
  c = ml_collections.ConfigDict()
  c.mode = "distill"
  c.seed = 0
  c.workdir = ""            # default: runs/<config name>
  c.distributed = False     # jax.distributed.initialize() when True
  c.smoke = smoke

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic"   # "synthetic" (generated into the workdir) or "folder"
  c.data.root = ""            # layout folder for data.name == "folder"
  c.data.image_size = (120, 160) if not smoke else (64, 80)
  c.data.synthetic_places = ml_collections.ConfigDict(
      {"train": 200, "val": 60, "test": 100} if not smoke else
      {"train": 24, "val": 12, "test": 12})

  c.rgb = ml_collections.ConfigDict()
  c.rgb.backbone = "mobilenet_v2"
  c.rgb.width = 1.0 if not smoke else 0.35
  c.rgb.dim = 128 if not smoke else 16       # common local dim (1x1 projection)
  c.rgb.num_clusters = 32 if not smoke else 4
  c.rgb.init = ""                            # "" or "imagenet_tflite:<path>"

  c.seg = ml_collections.ConfigDict()
  c.seg.backbone = "mobilenet_light"
  c.seg.width = 1.0 if not smoke else 0.35
  c.seg.dim = c.rgb.get_ref("dim")
  c.seg.num_clusters = c.rgb.get_ref("num_clusters")
  c.seg.init = ""
  c.seg.slme = "slme"                        # "slme" | "onehot" | "group_onehot"

  c.distill = ml_collections.ConfigDict()
  c.distill.weighting = "sigmoid"            # sigmoid | group | uniform | teacher_only
  c.distill.beta = 10.0
  c.distill.tau = 1
  c.distill.lambda_kd = 1.0
  c.checkpoint = ""                          # eval: Orbax directory to restore
  return c
