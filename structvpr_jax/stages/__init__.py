"""The stages of a StructVPR run, one public entry each.

  data.prepare(config, wd) -> layout root      synthetic city / preset conversion / folder
  train.run(config, wd, branch)                stage 1: the RGB or the seg branch
  partition.run(config, wd)                    D1-D4 groups and Eq. 3 weights
  distill.run(config, wd)                      stage 2: the RGB student with the seg teacher
  evaluate.run(config, wd)                     test recalls of every branch + report
  evaluate.run_checkpoint(config, wd)          eval mode: one checkpoint alone

Stages import the libraries below them, never each other: what one stage
hands the next travels through the workdir (`workdir.Workdir`).
"""
