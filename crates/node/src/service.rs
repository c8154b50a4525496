//! The client gRPC service: every request becomes a
//! [`concord_core::Request`] (the conversions live with each type, in
//! `concord_core::crdt`) and is run by the [`Engine`]; its outcome goes
//! back through the same type's conversion.

use std::pin::Pin;

use concord_core::crdt::StreamId;
use concord_core::proto::crdt_type_from_proto;
use concord_core::{CrdtType, Request as CoreRequest};
use concord_proto::v1 as pb;
use concord_proto::v1::concord_server::Concord;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::engine::Engine;
use crate::error::NodeError;
use crate::metrics::observe_rpc;
use crate::peer::Peers;

/// The `concord.v1.Concord` service.
#[derive(Debug, Clone)]
pub struct ClientService {
    engine: Engine,
    peers: Peers,
    started_unix_ms: i64,
}

impl ClientService {
    /// The service over `engine`, reporting `peers` in its status.
    pub fn new(engine: Engine, peers: Peers) -> Self {
        let started_unix_ms = engine.clock().physical_unix_ms();
        ClientService {
            engine,
            peers,
            started_unix_ms,
        }
    }

    /// Runs one request and returns its result.
    async fn one(&self, request: CoreRequest) -> Result<pb::operation_result::Result, Status> {
        let mut results = self.run(vec![request]).await?;
        results
            .pop()
            .and_then(|r| r.result)
            .ok_or_else(|| Status::internal("an operation returned no result"))
    }

    async fn run(&self, requests: Vec<CoreRequest>) -> Result<Vec<pb::OperationResult>, Status> {
        let done = self.engine.run(requests).await?;
        let results = done
            .into_iter()
            .map(|(request, outcome)| outcome.into_proto(&request.command))
            .collect::<concord_core::Result<Vec<_>>>()
            .map_err(NodeError::from)?;
        Ok(results)
    }
}

/// Unwraps the expected case of a result, which the engine guarantees.
macro_rules! expect_result {
    ($result:expr, $case:ident) => {
        match $result {
            pb::operation_result::Result::$case(r) => Ok(Response::new(r)),
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    };
}

#[tonic::async_trait]
impl Concord for ClientService {
    async fn create_keyspace(
        &self,
        request: Request<pb::CreateKeyspaceRequest>,
    ) -> Result<Response<pb::CreateKeyspaceResponse>, Status> {
        observe_rpc("create_keyspace", async move {
            let r = request.into_inner();
            let ty = crdt_type_from_proto(r.r#type).map_err(NodeError::from)?;
            let (view, created) = self.engine.create_keyspace(r.name, ty).await?;
            Ok(Response::new(pb::CreateKeyspaceResponse {
                keyspace: Some((&view).into()),
                created,
            }))
        })
        .await
    }

    async fn list_keyspaces(
        &self,
        _request: Request<pb::ListKeyspacesRequest>,
    ) -> Result<Response<pb::ListKeyspacesResponse>, Status> {
        observe_rpc("list_keyspaces", async move {
            let catalog = self.engine.store().catalog().map_err(NodeError::from)?;
            Ok(Response::new(pb::ListKeyspacesResponse {
                keyspaces: catalog.list().iter().map(Into::into).collect(),
            }))
        })
        .await
    }

    async fn describe_keyspace(
        &self,
        request: Request<pb::DescribeKeyspaceRequest>,
    ) -> Result<Response<pb::KeyspaceInfo>, Status> {
        observe_rpc("describe_keyspace", async move {
            let name = request.into_inner().name;
            if name.is_empty() {
                return Err(NodeError::InvalidRequest("keyspace name is empty".into()).into());
            }
            let catalog = self.engine.store().catalog().map_err(NodeError::from)?;
            let view = catalog
                .describe(&name)
                .ok_or(NodeError::UnknownKeyspace(name))?;
            Ok(Response::new((&view).into()))
        })
        .await
    }

    async fn counter_increment(
        &self,
        request: Request<pb::CounterIncrementRequest>,
    ) -> Result<Response<pb::CounterIncrementResponse>, Status> {
        observe_rpc("counter_increment", async move {
            expect_result!(
                self.one(request.into_inner().into()).await?,
                CounterIncrement
            )
        })
        .await
    }

    async fn counter_get(
        &self,
        request: Request<pb::CounterGetRequest>,
    ) -> Result<Response<pb::CounterGetResponse>, Status> {
        observe_rpc("counter_get", async move {
            expect_result!(self.one(request.into_inner().into()).await?, CounterGet)
        })
        .await
    }

    async fn set_add(
        &self,
        request: Request<pb::SetAddRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        observe_rpc("set_add", async move {
            expect_result!(self.one(request.into_inner().into()).await?, SetAdd)
        })
        .await
    }

    async fn set_remove(
        &self,
        request: Request<pb::SetRemoveRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        observe_rpc("set_remove", async move {
            expect_result!(self.one(request.into_inner().into()).await?, SetRemove)
        })
        .await
    }

    async fn set_members(
        &self,
        request: Request<pb::SetMembersRequest>,
    ) -> Result<Response<pb::SetMembersResponse>, Status> {
        observe_rpc("set_members", async move {
            expect_result!(self.one(request.into_inner().into()).await?, SetMembers)
        })
        .await
    }

    async fn set_contains(
        &self,
        request: Request<pb::SetContainsRequest>,
    ) -> Result<Response<pb::SetContainsResponse>, Status> {
        observe_rpc("set_contains", async move {
            expect_result!(self.one(request.into_inner().into()).await?, SetContains)
        })
        .await
    }

    async fn register_set(
        &self,
        request: Request<pb::RegisterSetRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        observe_rpc("register_set", async move {
            expect_result!(self.one(request.into_inner().into()).await?, RegisterSet)
        })
        .await
    }

    async fn register_get(
        &self,
        request: Request<pb::RegisterGetRequest>,
    ) -> Result<Response<pb::RegisterGetResponse>, Status> {
        observe_rpc("register_get", async move {
            expect_result!(self.one(request.into_inner().into()).await?, RegisterGet)
        })
        .await
    }

    async fn stream_append(
        &self,
        request: Request<pb::StreamAppendRequest>,
    ) -> Result<Response<pb::StreamAppendResponse>, Status> {
        observe_rpc("stream_append", async move {
            expect_result!(self.one(request.into_inner().into()).await?, StreamAppend)
        })
        .await
    }

    async fn stream_range(
        &self,
        request: Request<pb::StreamRangeRequest>,
    ) -> Result<Response<pb::StreamRangeResponse>, Status> {
        observe_rpc("stream_range", async move {
            let request = request.into_inner().try_into().map_err(NodeError::from)?;
            expect_result!(self.one(request).await?, StreamRange)
        })
        .await
    }

    async fn stream_trim(
        &self,
        request: Request<pb::StreamTrimRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        observe_rpc("stream_trim", async move {
            let op = CoreRequest::try_from(request.into_inner()).map_err(NodeError::from)?;
            expect_result!(self.one(op).await?, StreamTrim)
        })
        .await
    }

    type StreamSubscribeStream =
        Pin<Box<dyn Stream<Item = Result<pb::StreamEntry, Status>> + Send + 'static>>;

    async fn stream_subscribe(
        &self,
        request: Request<pb::StreamSubscribeRequest>,
    ) -> Result<Response<Self::StreamSubscribeStream>, Status> {
        observe_rpc("stream_subscribe", async move {
            let r = request.into_inner();
            if r.keyspace.is_empty() {
                return Err(NodeError::InvalidRequest("keyspace name is empty".into()).into());
            }
            self.engine
                .store()
                .limits()
                .check_key(&r.key)
                .map_err(NodeError::from)?;
            let catalog = self.engine.store().catalog().map_err(NodeError::from)?;
            let keyspace = catalog
                .resolve(&r.keyspace)
                .ok_or_else(|| NodeError::UnknownKeyspace(r.keyspace.clone()))?;
            if keyspace.ty != CrdtType::Stream {
                return Err(NodeError::WrongType {
                    keyspace: r.keyspace,
                    is: keyspace.ty,
                    needs: CrdtType::Stream,
                }
                .into());
            }
            let stream = self.engine.subscriptions().subscribe(
                self.engine.store().clone(),
                keyspace,
                r.key,
                r.after.map(StreamId::from),
            );
            let stream: Self::StreamSubscribeStream = Box::pin(stream);
            Ok(Response::new(stream))
        })
        .await
    }

    async fn batch(
        &self,
        request: Request<pb::BatchRequest>,
    ) -> Result<Response<pb::BatchResponse>, Status> {
        observe_rpc("batch", async move {
            let ops = request
                .into_inner()
                .operations
                .into_iter()
                .map(CoreRequest::try_from)
                .collect::<Result<Vec<_>, _>>()
                .map_err(NodeError::from)?;
            let results = self.run(ops).await?;
            Ok(Response::new(pb::BatchResponse { results }))
        })
        .await
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        observe_rpc("status", async move {
            let store = self.engine.store();
            let clock = self.engine.clock();
            let catalog = store.catalog().map_err(NodeError::from)?;
            let applied = store.version_vector().map_err(NodeError::from)?;
            let durability = match store.durability() {
                concord_store::Durability::Group => pb::DurabilityMode::Group,
                concord_store::Durability::Relaxed => pb::DurabilityMode::Relaxed,
            };
            let uptime_ms = clock
                .physical_unix_ms()
                .saturating_sub(self.started_unix_ms);
            Ok(Response::new(pb::StatusResponse {
                region: store.identity().region.clone(),
                replica_id: store.identity().replica.0,
                hlc: clock.last().as_u64(),
                applied: Some((&applied).into()),
                peers: self.peers.status(&self.engine).await?,
                durability: durability.into(),
                keyspace_conflicts: catalog.conflict_count() as u32,
                uptime_seconds: (uptime_ms.max(0) / 1000) as u64,
                version: env!("CARGO_PKG_VERSION").to_string(),
            }))
        })
        .await
    }
}
