"""The ``clipbatch`` console script: the library's commands plus those that run flows."""
