"""The XLA:CPU defaults of the entry points: appended, never overriding."""

from structvpr_jax import xla_flags

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def test_defaults_are_appended_and_the_users_choice_wins():
  assert xla_flags.with_defaults({})["XLA_FLAGS"] == f"{FLAG}=false"
  env = xla_flags.with_defaults({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", f"{FLAG}=false"]
  mine = {"XLA_FLAGS": f"{FLAG}=true"}
  assert xla_flags.with_defaults(mine)["XLA_FLAGS"] == f"{FLAG}=true"
  assert "XLA_FLAGS" not in xla_flags.with_defaults({xla_flags.OPT_OUT_ENV: "1"})
  assert xla_flags.with_defaults({xla_flags.OPT_OUT_ENV: "0"})["XLA_FLAGS"] == f"{FLAG}=false"
