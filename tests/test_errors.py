"""Every project exception reaches the user with its message when it is raised inside a Ray worker.

Ray pickles an exception raised in a task or a Train worker to send it to the driver; an exception whose
``__init__`` takes more than the message must survive that, or the user sees an unpickling ``TypeError``
instead of the file and problem it names.
"""

from __future__ import annotations

import os
import pickle

import pytest

from crossmoco_ray.errors import ConfigError, DataError, ResumeError

EXCEPTIONS = [
    DataError("/data/mn40/train.h5", "no 'label' dataset; all 9 rows skipped", 4, rows=9),
    DataError("obj-7", "view 1 does not decode"),
    ConfigError("train.batch_size=20 does not split evenly over train.num_workers=3; use ..."),
    ResumeError("cannot resume MLflow run 0a1b from the tracking store sqlite:///x/mlflow.db: no such run"),
]


def _project_exceptions() -> set[type[BaseException]]:
    import crossmoco_ray.errors

    found = set()
    for module in (crossmoco_ray.errors,):
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                found.add(value)
    return found


def test_every_project_exception_is_covered() -> None:
    assert _project_exceptions() == {type(e) for e in EXCEPTIONS}


@pytest.mark.parametrize("err", EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_pickle_round_trip_keeps_message_and_fields(err: Exception) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert vars(back) == vars(err)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("err", EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_raised_inside_a_ray_task_the_driver_sees_the_message(err: Exception, ray_session: None) -> None:
    import ray

    @ray.remote(num_cpus=0)
    def fail() -> None:
        raise err

    with pytest.raises(type(err)) as caught:
        ray.get(fail.remote())
    assert str(err) in str(caught.value)
    if isinstance(err, DataError):
        assert caught.value.source == err.source  # type: ignore[attr-defined]
        assert caught.value.rows == err.rows  # type: ignore[attr-defined]


def test_a_data_errors_message_prints_anywhere_and_stays_bounded() -> None:
    name = "/data/" + os.fsdecode(b"\xff\xfe") + "\nforged line" + "x" * 5000 + ".ply"
    err = DataError(name, "bad\x1b[2J" + "y" * 10_000, index=3)
    text = str(err)
    text.encode("utf-8")  # no lone surrogates: print() cannot fail on it
    assert text.isprintable()  # no newline forging a log line, no terminal escapes
    assert len(text) < 2300
    assert "[index 3]" in text
    assert text.endswith("…" + "y" * (len(text) - text.rindex("…") - 1))
    again = pickle.loads(pickle.dumps(err))  # the fields stay as they were (the skipped report keeps them)
    assert (again.source, again.problem, again.index) == (name, err.problem, 3)
