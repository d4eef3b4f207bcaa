"""clipbatch's deployment definitions, as data: ``prefect.yaml`` and the work pools' job
templates. Installed with the package as ``clipbatch_deployments``, so that
``clipbatch deploy`` registers the same deployments from a wheel as ``prefect deploy
--all --prefect-file deployments/prefect.yaml`` does from a checkout."""
