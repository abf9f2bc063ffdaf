"""Only registered names run, under the name the decorator gave them."""
from __future__ import annotations

import pytest

from dispatcher.errors import ConfigError, InvalidTask, UnknownTask
from dispatcher.registry import Registry


def test_default_name_is_module_dot_function_and_the_function_is_unchanged():
    reg = Registry()

    def resize(path, width=640):
        return path, width

    assert reg.task(resize) is resize
    assert reg.names() == [f"{__name__}.test_default_name_is_module_dot_function_and_the_function_is_unchanged.<locals>.resize"]


def test_explicit_name_and_policy():
    reg = Registry()

    @reg.task(name="media.resize", max_retries=5, time_limit=10)
    def resize(path):
        return path

    spec = reg.get("media.resize")
    assert (spec.fn, spec.max_retries, spec.time_limit) == (resize, 5, 10)


def test_unknown_names_and_bad_arguments_are_refused():
    reg = Registry()
    reg.task(name="a")(lambda x, y=1: x)
    with pytest.raises(UnknownTask, match="unknown task 'b'; this dispatcher knows: a"):
        reg.get("b")
    with pytest.raises(InvalidTask, match="args do not fit"):
        reg.get("a").check_call((1, 2, 3), {})
    reg.get("a").check_call((1,), {"y": 2})


def test_one_name_for_two_functions_is_a_config_error():
    reg = Registry()
    reg.task(name="same")(lambda: 1)

    def other():
        return 2

    with pytest.raises(ConfigError, match="registered twice"):
        reg.task(name="same")(other)


def test_import_errors_are_clear():
    with pytest.raises(ConfigError, match="cannot import task module 'no_such_module_xyz'"):
        Registry().import_modules(["no_such_module_xyz"])


@pytest.mark.parametrize("options, message", [
    ({"soft_time_limit": 0}, "soft_time_limit must be > 0"),
    ({"time_limit": -1.0}, "time_limit must be > 0"),
    ({"max_retries": -1}, "max_retries must be >= 0"),
])
def test_task_options_are_checked_when_the_module_is_imported(options, message):
    with pytest.raises(ConfigError, match=message):
        Registry().task(name="bad", **options)(lambda: None)
