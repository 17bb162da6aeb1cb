"""Operations: failure alerts and the worker identity Airflow records."""
