"""The results pages of the Airflow UI plugin (plugins/alexnet_results.py): the run view model and SVG charts."""
