-- Runs once, when the PostgreSQL volume is first initialised: Prefect uses the
-- "prefect" database (POSTGRES_DB), Label Studio its own.
CREATE DATABASE label_studio;
