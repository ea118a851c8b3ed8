-- Run once by the postgres image when its volume is empty: the Optuna study lives in the database
-- POSTGRES_DB (hpo); MLflow's backend store gets its own database.
CREATE DATABASE mlflow;
