"""`check_tracking_for_cluster`: a tracking store in local files is refused once a run spans several nodes."""
from __future__ import annotations

import pytest

from moeclip.bench.tracking import check_tracking_for_cluster
from moeclip.errors import MoeclipError

LOCAL = {  # URI -> what the message calls it
    "sqlite:///mlflow.db": "a SQLite database file",
    "sqlite:////shared/zsad-bench/mlflow.db": "a SQLite database file",
    "sqlite+pysqlite:///mlflow.db": "a SQLite database file",
    "file:///shared/zsad-bench/mlruns": "a local directory",
    "file:mlruns": "a local directory",
    "./mlruns": "a local directory",
    "mlruns": "a local directory",
    "/shared/zsad-bench/mlruns": "a local directory",
}
SERVERS = ("http://head:5000", "https://mlflow.example.org", "HTTP://HEAD:5000", "databricks",
           "databricks://my-profile", "postgresql://mlflow:secret@db:5432/mlflow",
           "postgresql+psycopg2://mlflow@db/mlflow", "mysql://mlflow@db/mlflow", "mysql+pymysql://mlflow@db/mlflow")


@pytest.mark.parametrize("uri", [*LOCAL, *SERVERS])
@pytest.mark.parametrize("nodes", [0, 1])
def test_one_node_accepts_every_uri(uri: str, nodes: int):
    assert check_tracking_for_cluster(uri, nodes) is None


@pytest.mark.parametrize("uri", SERVERS)
@pytest.mark.parametrize("nodes", [2, 16])
def test_servers_are_accepted_on_several_nodes(uri: str, nodes: int):
    assert check_tracking_for_cluster(uri, nodes) is None


@pytest.mark.parametrize("uri", LOCAL)
def test_a_local_store_is_refused_on_two_nodes_in_one_line_naming_uri_problem_and_remedy(uri: str):
    with pytest.raises(MoeclipError) as raised:
        check_tracking_for_cluster(uri, 2)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"tracking URI '{uri}' is {LOCAL[uri]}, which 2 nodes cannot write safely at once; ")
    assert "use an MLflow tracking server instead" in message
    assert "http(s)://" in message and "http://head:5000" in message
    assert message.endswith("(see docs/several-machines.md)")


def test_the_message_counts_the_nodes():
    with pytest.raises(MoeclipError, match=r"^tracking URI 'sqlite:///mlflow.db' is a SQLite database file, "
                                           r"which 8 nodes cannot write safely at once; "):
        check_tracking_for_cluster("sqlite:///mlflow.db", 8)
