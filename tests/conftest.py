"""Fixtures shared by every test: the data set (read from ../shared, never from the repo) and the shipped model."""

from __future__ import annotations

import os

import pytest

from model import data
from model.package import SHIPPED, load
from model.score import Scorer


@pytest.fixture(scope="session")
def ai4i_path():
    path = data.default_path()
    if not path.is_file():
        message = (f"the AI4I 2020 data set is not at {path}: set {data.DATA_ENV} to its path "
                   "(it is never committed to this repository)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def ai4i(ai4i_path):
    return data.load(ai4i_path)


@pytest.fixture(scope="session")
def shipped_model():
    return load(SHIPPED)


@pytest.fixture(scope="session")
def scorer(shipped_model):
    return Scorer(shipped_model)
