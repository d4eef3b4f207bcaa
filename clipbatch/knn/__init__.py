"""kNN indexes of a table's vectors (``{root}/_knn/{name}/``): build, keep current, search."""
