//! Walking the operations of an OpenAPI document: [`crate::auth`] marks the
//! protected ones, [`crate::openapi`] tidies the generated document. A
//! module of its own so that neither imports the other for it.

use utoipa::openapi::path::{Operation, PathItem};

/// Every operation of the document.
pub(crate) fn operations(
    doc: &mut utoipa::openapi::OpenApi,
) -> impl Iterator<Item = &mut Operation> {
    doc.paths
        .paths
        .values_mut()
        .flat_map(|item: &mut PathItem| {
            [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
                &mut item.query,
            ]
            .into_iter()
            .flatten()
            .chain(item.additional_operations.values_mut())
        })
}
