"""What every kdshards process shares at run time, whatever its phase: the typed config
loader (YAML plus `key=value` into frozen dataclasses), progress lines, and the watchdog
that makes a process's children die with it. It imports nothing from the phases."""
