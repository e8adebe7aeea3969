"""Small DataFrames made on the driver from numpy arrays (ids of a night's change, and the like).

Made through pandas, so that Spark takes them over Arrow when
``spark.sql.execution.arrow.pyspark.enabled`` is on (the project's default): 100k ids as
Python tuples cost seconds, as one Arrow batch milliseconds.
"""

from __future__ import annotations

import numpy as np


def id_frame(spark, ids, name: str = "image_id"):
    """A one-column DataFrame ``name long`` of ``ids``."""
    return columns_frame(spark, {name: np.asarray(ids, dtype=np.int64)}, f"{name} long")


def columns_frame(spark, columns: dict, ddl: str):
    """A DataFrame of parallel numpy columns, with the schema ``ddl``."""
    import pandas as pd

    return spark.createDataFrame(pd.DataFrame({k: np.asarray(v) for k, v in columns.items()}), ddl)
