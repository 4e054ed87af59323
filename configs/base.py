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
  c.mode = "structvpr"      # a key of structvpr_jax.main.MODES
  c.seed = 0
  # TensorBoard scalars (loss, lr, val recalls per stage) in event files beside
  # <workdir>/metrics.jsonl: `tensorboard --logdir runs/` (no TensorFlow needed).
  c.tensorboard = True
  c.workdir = ""            # default: runs/<config name>
  c.distributed = False     # jax.distributed.initialize() when True
  c.smoke = smoke
  c.compilation_cache = "default"  # ~/.cache/structvpr_jax/xla; "" disables
  # A finished stage records the settings it ran with; a command with other
  # settings on the same workdir stops naming each differing field, unless
  # rerun_from names that stage or an earlier one (rgb, seg, partition,
  # distill, eval): then stale stages from there on are removed and redone.
  c.rerun_from = ""

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic"   # "synthetic" (generated into the workdir) or "folder"
  c.data.root = ""            # layout folder for data.name == "folder"
  c.data.image_size = (96, 128) if not smoke else (64, 80)
  c.data.synthetic_places = ml_collections.ConfigDict(
      {"train": 200, "val": 60, "test": 100} if not smoke else
      {"train": 24, "val": 12, "test": 12})
  c.data.queries_per_place = 2 if not smoke else 1
  c.data.normalization = "tflite"     # "tflite" ([-1, 1], the TFLite ImageNet weights) | "imagenet"
  c.data.num_threads = 2              # JPEG decode threads
  c.data.prefetch = 2                 # batches assembled ahead of the step
  # Decoded training images kept in memory (GiB, least recently used out; 0 =
  # none). A split that fits is decoded (and checked) up front; a larger one
  # is checked by file headers only and decoded when used.
  c.data.cache_gb = 2.0
  # Where pixels come from: "folder" (decode the layout's JPEG/PNG files) or
  # "array_record" (pre-resized uint8 records, `data/records.py`; written by
  # the data stage on first use, or by `python -m structvpr_jax.data.convert
  # export-records`) into <layout root>/records/<H>x<W>. Same bytes either
  # way, so results do not change.
  c.data.format = "folder"

  c.model = ml_collections.ConfigDict()
  # The 3x3 depthwise kernel of both backbones: "auto" (the native C++ kernels
  # on the CPU when they build, else 9 shifted multiply-adds; one grouped
  # convolution on GPU/TPU) | "native" | "shifted" | "grouped". Equal results
  # up to float rounding (tests/test_mobilenet.py, tests/test_native_kernels.py);
  # stored in the checkpoint's spec, but evaluating a checkpoint runs with this
  # config's value (checkpoint.restore_variables(config=)).
  c.model.depthwise = "auto"
  # Fold frozen BatchNorm (evaluation, and train.batchnorm="frozen") into the
  # preceding convolution: same parameters, equal up to float rounding (one
  # forward and gradient: float64 test). On by default: the frozen train
  # step runs 1.2-1.6x faster on the CPU, and over 6 seeds the RGB stage's
  # val recall is no worse than unfolded (experiments/results/kernel_val.md).
  c.model.fold_bn = True
  # With fold_bn and the native kernels: evaluate each inverted-residual block
  # (expand 1x1, depthwise 3x3, project 1x1, residual) as one native pass that
  # never writes the 6x expansion to memory; forward 1.3-1.4x faster on the
  # CPU, equal up to float rounding. Training and its gradients run the
  # separate layers either way. Like model.depthwise, evaluating a checkpoint
  # runs with this config's value, whatever the checkpoint was trained with.
  c.model.fused_blocks = True

  c.rgb = ml_collections.ConfigDict()
  c.rgb.backbone = "mobilenet_v2"
  c.rgb.width = 1.0 if not smoke else 0.35   # 1.0 = the paper's MobileNetV2 (and the ImageNet file's)
  c.rgb.dim = 128 if not smoke else 16       # common local dim (1x1 projection)
  c.rgb.num_clusters = 32 if not smoke else 4
  # "auto": ImageNet weights when the TFLite file is found ($STRUCTVPR_IMAGENET_TFLITE or
  # ../shared/data/models/mobilenet_v2_1.0_224_quant.tflite), else random (with a warning);
  # "" = random; "imagenet_tflite:<path>". Measured on the default synthetic world: the
  # ImageNet backbone + k-means NetVLAD, untrained, reaches val R@1 ~60 %; a randomly
  # initialised RGB branch trained for this budget stays near chance (~17 %).
  c.rgb.init = "auto" if not smoke else ""
  c.rgb.norm = "batch"                       # "batch" | "group" (GroupNorm)
  c.rgb.output_stride = 32                   # 32 | 16 | 8 (finer local feature map)
  c.rgb.num_steps = 0                        # 0: train.num_steps
  c.rgb.learning_rate = 0.0                  # 0: train.learning_rate
  c.rgb.batchnorm = ""                       # "" = train.batchnorm
  c.rgb.mining = ""                          # "" = train.mining
  c.rgb.max_epochs = 0                     # 0: train.max_epochs
  c.rgb.patience = 0                       # 0: train.patience

  c.seg = ml_collections.ConfigDict()
  c.seg.backbone = "mobilenet_light"
  c.seg.width = 1.0 if not smoke else 0.35
  c.seg.dim = c.rgb.get_ref("dim")
  c.seg.num_clusters = c.rgb.get_ref("num_clusters")
  c.seg.init = ""
  c.seg.slme = "slme"                        # "slme" | "onehot" | "group_onehot"
  # "batch" | "group": GroupNorm normalises each image by itself (no running
  # statistics), for a branch trained from scratch; with "batch" and frozen BN
  # (train.batchnorm) a from-scratch branch is not normalised at all.
  c.seg.norm = "batch"
  # 16: a 6x8 local feature map at 96x128 instead of 3x4 (12 features for 32
  # clusters). With lr 3e-4, chosen on val (seeds 0/1/2, 120 val queries each,
  # selected checkpoint): teacher val R@1 90.0 / 62.5 / 74.2 vs 60.0 / 62.5 / 65.0
  # for stride 32 at lr 1e-3 (the earlier default), and steadier between evals.
  c.seg.output_stride = 16
  c.seg.blocks = ()                          # () = the light table; see models/mobilenet.py
  c.seg.num_steps = 160 if not smoke else 0  # 0: train.num_steps (step budget only)
  c.seg.learning_rate = 3e-4                 # from scratch: 3x the fine-tuning rate (see above)
  c.seg.batchnorm = ""                       # "" = train.batchnorm
  c.seg.mining = ""                          # "" = train.mining
  c.seg.max_epochs = 5 if not smoke else 0  # 0: train.max_epochs
  c.seg.patience = 0                       # 0: train.patience

  c.distill = ml_collections.ConfigDict()
  # sigmoid (Eq. 3, ours) | group | uniform | teacher_only | gate (teacher_only's
  # 0/1 weights with the KD normalised by the weights' sum instead of the batch)
  c.distill.weighting = "sigmoid"
  c.distill.beta = 10.0
  # Which stage-1 branches judge the training queries (ours): "stage1" = the
  # run's own (the paper's partition: queries the student already fitted);
  # "crossfit" = branches trained on one spatial half of the training places
  # partition the other half (4 extra stage-1 trainings, in <workdir>/crossfit/).
  c.distill.partition = "stage1"
  c.distill.tau = 1
  c.distill.lambda_kd = 1.0
  c.distill.num_steps = 0                    # 0: train.num_steps
  c.distill.learning_rate = 0.0              # 0: train.learning_rate
  c.distill.batchnorm = ""                   # "" = train.batchnorm
  c.distill.mining = ""                      # "" = train.mining
  c.distill.max_epochs = 0                 # 0: train.max_epochs
  c.distill.patience = 0                   # 0: train.patience
  c.distill.init_from_rgb = True             # student starts from the stage-1 RGB branch
  # True: the starting weights (stage-1 RGB) are validated as epoch 0 and
  # compete for the best checkpoint (False: train.eval_at_start)
  c.distill.eval_at_start = False
  # KD form (ours; the paper names none): "feature" = ||s - t||^2 on normalised
  # descriptors; "adaptor" = the same after a trainable linear head on s (loss
  # only, not exported); "relational" = KL of softmax(-distance / temperature)
  # over each query's positive and negatives (teacher vs student).
  # "relational_batch" = the same over every candidate of the batch (all
  # triplets' positives and negatives), the teacher's softmax at
  # teacher_temperature; "rkd" = RKD distance (query-to-candidate distances of
  # the batch divided by their mean, smooth-L1).
  c.distill.kd = "feature"
  c.distill.temperature = 0.1                # relational forms: the student's softmax T
  c.distill.teacher_temperature = 0.0        # relational forms: the teacher's T (0: temperature)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8 if not smoke else 2        # global triplets per step
  c.train.num_negatives = 4 if not smoke else 2     # M hard negatives per triplet
  c.train.mining = "hard"                           # "hard" (NetVLAD recipe) | "random"
  c.train.num_candidates = 1000                     # random negatives per mining refresh
  c.train.refresh_every = 128 if not smoke else 8   # queries per mining-cache refresh
  c.train.num_steps = 100 if not smoke else 4      # rgb and distill (seg: seg.num_steps)
  # Epochs and early stopping (the VPR convention; epoch_queries 0 = the step
  # budget above, validated every eval_every steps): an epoch is epoch_queries
  # training queries (mining refreshes inside it every refresh_every queries),
  # validated after each; a stage stops after `patience` epochs without a
  # better val select_metric (0: never early), or at max_epochs. The same rule
  # for stage 1, stage 2 and the no-KD control; done.json says why it stopped.
  # The default synthetic run keeps a small budget (epochs of 320 of its 400
  # queries, at most 3, stop after 2 without improvement; seg at most 5);
  # smoke runs keep the step budget (num_steps).
  c.train.epoch_queries = 320 if not smoke else 0
  c.train.patience = 2 if not smoke else 0
  c.train.max_epochs = 3 if not smoke else 0
  # Checkpoint selection and early stopping on the val split: "R@5" (the
  # benchmark's; ties broken by R@1; configs/pitts30k.py, gardens_point.py)
  # or "R@1" (ties by R@5). The synthetic configs use R@1: on this world's
  # small val split R@5 sits at 95-100 % from the first epoch (the default
  # run's seg branch: 100 at epoch 1), so it can neither pick a checkpoint
  # nor tell early stopping anything.
  c.train.select_metric = "R@1"
  # Learning rate after warmup: "cosine" decay to final_lr_fraction over the
  # budget (num_steps, or max_epochs epochs) or "constant" (the benchmark's Adam).
  c.train.lr_schedule = "cosine"
  c.train.learning_rate = 1e-4                      # fine-tuning rate (seg overrides)
  c.train.warmup_steps = 20 if not smoke else 0
  c.train.final_lr_fraction = 0.01
  c.train.optimizer = "adam"
  c.train.grad_clip = 1.0
  c.train.weight_decay = 0.0
  c.train.margin = 0.1
  # Compute dtype of training: "float32" | "bfloat16" (mixed precision for GPU /
  # TPU: parameters, optimizer state, BN statistics and losses stay float32;
  # extraction and evaluation run in float32).
  c.train.dtype = "float32"
  # Augmentation inside the jitted step, training only: "" (off) or a comma list
  # of "crop" (random resized crop, the same box for an image's RGB and label
  # map) and "color" (brightness, contrast, saturation, hue jitter of RGB).
  c.train.augment = ""
  # First backbone block that trains (0 = all): the stem and earlier blocks get
  # no gradient (their backward pass is skipped) and no update, the usual VPR
  # fine-tuning of the last blocks. MobileNetV2 has blocks 0-16.
  c.train.trainable_from = 0
  # Recompute each backbone block's activations in the backward pass instead of
  # keeping them (memory of a 480x640 step is mostly those activations);
  # about one more forward pass of compute, same values.
  c.train.remat = False
  c.train.crop_scale = (0.6, 1.0)                 # crop area fraction range
  c.train.color_jitter = (0.3, 0.3, 0.3, 0.05)    # brightness, contrast, saturation, hue (turns)
  # "batch": synchronised batch statistics (BN running stats updated);
  # "frozen": BN uses its running stats and never updates them (the usual
  # choice when fine-tuning a pretrained backbone). Measured on the default
  # synthetic run: the seg branch from scratch reaches val R@1 79 % with
  # frozen BN and stays near chance (~19 %) with batch statistics.
  c.train.batchnorm = "frozen"
  # Evaluate the starting weights on val and checkpoint them as step 0, so the
  # best-checkpoint selection can keep them when fine-tuning does not help
  # (small training sets; configs/gardens_point.py turns it on).
  c.train.eval_at_start = False
  # Stage 2: also log |d(triplet)/d(descriptors)| and |d(lambda KD)/d(descriptors)|
  # (how hard each term pulls the embedding). Off by default: the extra ops may
  # change XLA's fusion and so the last bits of a run.
  c.train.log_term_grads = False
  c.train.log_every = 10 if not smoke else 2
  c.train.eval_every = 40 if not smoke else 4
  c.train.kmeans_images = 200 if not smoke else 16  # images sampled for NetVLAD k-means
  c.train.kmeans_per_image = 50
  c.train.inject_nan_at_step = 0   # testing only: poison the parameters after this step

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32 if not smoke else 8   # images per device per extraction batch
  # Images per device run at a time inside an extraction batch (lax.map over
  # chunks; must divide eval.batch_size). 0 = auto: on the CPU chunks of at
  # most 2^20 pixels (16 images at 224, 2 at 480x640), whose largest
  # activation stays about the L3 cache's size (evaluation.MICRO_BATCH_PIXELS;
  # experiments/performance/bench.py `*_whole` lever); with the native fused blocks only
  # the half-resolution layers (stem and the blocks reading it) go in chunks.
  # The whole batch on GPU/TPU. Descriptors equal up to float rounding.
  c.eval.micro_batch = 0
  c.eval.ns = (1, 5, 10, 20)
  c.eval.radius = 25.0
  # PCA(-whitening) of the global descriptors to pca_dim, fitted on the train
  # split (0 = off, the full K*D descriptor). See experiments/descriptor_tradeoff.py.
  # Search of the test evaluation: "flat" (exact, the VPR convention) or "ivf_pq"
  # (faiss IVF-PQ for databases too large for exact search; 0 = automatic
  # nlist ~ 4 sqrt(N) and pq_m = the largest divisor of D <= min(64, D/16)).
  c.eval.index = "flat"
  c.eval.ivf_nlist = 0
  c.eval.pq_m = 0
  c.eval.nprobe = 16
  # Descriptors of the evaluated split: "memory" (float32 arrays) or "disk"
  # (streamed to <workdir>/eval/<split>/descriptors/<branch>/{database,queries}.npy
  # in eval.descriptor_dtype, then memory-mapped: host memory holds one batch).
  # eval.search_block_rows > 0: exact search reads the database that many rows
  # at a time (memory O(queries x k) + one block; same results).
  c.eval.descriptors = "memory"
  c.eval.descriptor_dtype = "float32"
  c.eval.search_block_rows = 0
  c.eval.pca_dim = 0
  c.eval.pca_whiten = True
  # Re-ranking of the global top-K with local features of the same branch
  # ("StructVPR + R"; docs/usage.md#re-ranking-structvpr--r): "none" | "rss"
  # (Patch-NetVLAD's rapid spatial scoring of mutual nearest neighbours, jitted)
  # | "ransac" (inliers of an OpenCV USAC homography / fundamental matrix).
  # Every evaluated branch gets a "+R" row beside its global row.
  c.eval.rerank = "none"
  c.eval.rerank_topk = 100                    # candidates re-ranked per query (as TransVPR)
  # "local": each window's mean L2-normalised projected local feature (rgb.dim
  # floats); "patchnetvlad": the branch's NetVLAD of each window (K x dim floats).
  c.eval.rerank_features = "local"
  # The feature map the windows lie on: "final" (the projected local features
  # NetVLAD aggregates) or "stride8" / "stride16" / "stride32": the backbone's
  # last block at that stride (MobileNetV2 stride16 = block12, 96 channels).
  # Defaults chosen on the Gardens Point val places (experiments/results/
  # rerank_gardens_point.md: stride16, 2x2 windows, rss; there top-K 10).
  c.eval.rerank_layer = "stride16"
  c.eval.rerank_patch_sizes = (2,)            # windows of p x p feature cells, one set each
  c.eval.rerank_patch_strides = (1,)          # one per patch size
  c.eval.rerank_patch_weights = ()            # one per patch size; () = equal
  # Local features kept per image (0: all), the windows whose features have the
  # largest mean norm: bounds storage (float16) and the matching's P x P work.
  # Gardens Point at 144x256 has 120 (stride16, 2x2 windows): all kept;
  # 480x640 has 1131.
  c.eval.rerank_max_features = 512
  c.eval.rerank_geometry = "homography"       # ransac: "homography" | "fundamental"
  c.eval.rerank_ransac_threshold = 1.5        # x output stride x patch stride pixels
  # Fusion: the re-ranking score adds this weight x each candidate's global
  # similarity, z-normalised over the top-K as each set's local score is
  # (rerank.fuse_global). 0: the local score alone (Patch-NetVLAD's re-ranking).
  c.eval.rerank_global_weight = 0.0
  c.eval_split = "test"
  c.checkpoint = ""                          # eval: Orbax directory to restore
  return c
