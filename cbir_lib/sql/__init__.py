"""SQL over the latest snapshot of every table: DuckDB (``cbir sql``) and Spark SQL (``register_views``)."""
