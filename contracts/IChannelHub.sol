// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title IChannelHub
/// @notice What integrators need of a ChannelHub: its types, events, errors and functions, each documented.
/// @dev Unidirectional payment channels (ETH or ERC-20). A voucher is `(channelId, cumulativeAmount)` signed by the
/// payer with EIP-712 (domain name "ChannelHub", version "1"; type `Voucher(bytes32 channelId,uint256
/// cumulativeAmount)`). Settlement credits the payee's balance inside the hub; balances are withdrawn separately.
///
/// What the hub deliberately does NOT support, for ERC-20 channels:
/// - rebasing or otherwise self-changing balances (stETH-style, interest-bearing): the hub records what arrived and
///   pays out recorded amounts; a balance that shrinks by itself leaves the last withdrawers short;
/// - tokens with blocklists (USDC, USDT): a blocked payee cannot withdraw and a blocked payer cannot get a refund; the
///   credited balance stays in the hub until the token unblocks the account, and other accounts are not affected;
/// - pausable tokens: while paused, opens, top-ups and withdrawals revert; settlement, which moves no tokens, goes on;
/// - tokens with hooks that call back (ERC-777): every state-changing function is non-reentrant, so a callback that
///   re-enters reverts the whole operation.
/// Fee-on-transfer tokens are supported: a deposit is what arrived, measured by the hub's balance change.
interface IChannelHub {
    // ------------------------------------------------------------------------------------------------------------
    // Types
    // ------------------------------------------------------------------------------------------------------------

    /// @notice Life cycle of a channel. `None` means the id was never opened; `Closed` ids can never be reopened.
    enum Status {
        None,
        Open,
        Closing,
        Closed
    }

    /// @notice Why `settleBatch` skipped an entry (carried by `VoucherSkipped`).
    enum SkipReason {
        None,
        UnknownChannel,
        ChannelClosed,
        ChallengeExpired,
        NotAboveSettled,
        ExceedsDeposit,
        InvalidSignature
    }

    /// @notice Full view of a channel, as returned by `channel`.
    struct ChannelView {
        address payer;
        address payee;
        address token;
        uint256 deposit;
        uint256 settled;
        uint256 closeDeadline;
        Status status;
    }

    // ------------------------------------------------------------------------------------------------------------
    // Events
    // ------------------------------------------------------------------------------------------------------------

    /// @notice A channel was opened.
    /// @param channelId keccak256(abi.encode(payer, payee, token, salt)).
    /// @param payer Who locked the deposit and signs vouchers.
    /// @param payee Who is paid.
    /// @param token The asset; address(0) for ETH.
    /// @param salt The payer's choice that makes the id unique.
    /// @param deposit What actually arrived (less than asked for a fee-on-transfer token).
    event ChannelOpened(
        bytes32 indexed channelId,
        address indexed payer,
        address indexed payee,
        address token,
        bytes32 salt,
        uint256 deposit
    );

    /// @notice A channel's deposit grew.
    /// @param channelId The channel.
    /// @param amount What arrived now.
    /// @param deposit The deposit after it.
    event ChannelToppedUp(bytes32 indexed channelId, uint256 amount, uint256 deposit);

    /// @notice Channels of one payee and token were settled. One event per group rather than per channel (a log costs
    /// 375 gas plus 375 per topic), and packed records rather than two arrays (log data costs 8 gas a byte): ~1,250
    /// gas less per settled channel than a typed event each.
    /// @param payee The group's payee.
    /// @param token The group's asset.
    /// @param credited What the payee was credited in total (the sum of the increments).
    /// @param settlements One 45-byte record per settled channel: channelId (32) | new cumulativeAmount (13,
    /// big-endian).
    event ChannelsSettled(address indexed payee, address indexed token, uint256 credited, bytes settlements);

    /// @notice A batch entry was skipped; the rest of the batch went on.
    /// @param channelId The channel the entry named (or would have named: `UnknownChannel`).
    /// @param reason Why.
    event VoucherSkipped(bytes32 indexed channelId, SkipReason reason);

    /// @notice The payer asked to close; vouchers settle until `deadline` (inclusive).
    /// @param channelId The channel.
    /// @param deadline Unix time, seconds: the challenge period's end.
    event CloseRequested(bytes32 indexed channelId, uint256 deadline);

    /// @notice A channel was closed.
    /// @param channelId The channel.
    /// @param settled The cumulative amount the payee was paid in all.
    /// @param refund deposit - settled, credited to the payer's balance.
    event ChannelClosed(bytes32 indexed channelId, uint256 settled, uint256 refund);

    /// @notice A credited balance was withdrawn.
    /// @param account Whose balance.
    /// @param token The asset; address(0) for ETH.
    /// @param to Where it went.
    /// @param amount How much.
    event Withdrawn(address indexed account, address indexed token, address to, uint256 amount);

    // ------------------------------------------------------------------------------------------------------------
    // Errors
    // ------------------------------------------------------------------------------------------------------------

    /// @dev The constructor was given a challenge period below `MIN_CHALLENGE_PERIOD` or above 2^32 - 1 seconds.
    /// @param challengePeriod What was given.
    error ChannelHubInvalidChallengePeriod(uint256 challengePeriod);
    /// @dev The channel id was opened before (maybe closed since): ids are never reused.
    /// @param channelId The id.
    error ChannelHubChannelExists(bytes32 channelId);
    /// @dev No channel has this id.
    /// @param channelId The id.
    error ChannelHubUnknownChannel(bytes32 channelId);
    /// @dev The operation needs an open channel and this one is closing or closed.
    /// @param channelId The channel.
    error ChannelHubChannelNotOpen(bytes32 channelId);
    /// @dev `finalizeClose` needs a closing channel and this one is still open: `requestClose` first.
    /// @param channelId The channel.
    error ChannelHubChannelNotClosing(bytes32 channelId);
    /// @dev The operation needs a channel that is open or closing, and this one is closed.
    /// @param channelId The channel.
    error ChannelHubChannelClosed(bytes32 channelId);
    /// @dev Only the channel's payer may do this.
    /// @param channelId The channel.
    /// @param caller Who tried.
    error ChannelHubNotPayer(bytes32 channelId, address caller);
    /// @dev Only the channel's payee may do this.
    /// @param channelId The channel.
    /// @param caller Who tried.
    error ChannelHubNotPayee(bytes32 channelId, address caller);
    /// @dev The challenge period is still running.
    /// @param channelId The channel.
    /// @param deadline Unix time, seconds, after which `finalizeClose` succeeds.
    error ChannelHubChallengeNotOver(bytes32 channelId, uint256 deadline);
    /// @dev A deposit, top-up or withdrawal of zero.
    error ChannelHubZeroAmount();
    /// @dev The payee is the zero address or the payer itself.
    /// @param payee What was given.
    error ChannelHubInvalidPayee(address payee);
    /// @dev The deposit would exceed `MAX_DEPOSIT`.
    /// @param deposit What it would have been.
    error ChannelHubDepositTooLarge(uint256 deposit);
    /// @dev ETH sent does not match the amount (ETH channels) or ETH was sent to a token channel.
    /// @param value `msg.value`.
    /// @param amount What it had to be.
    error ChannelHubWrongValue(uint256 value, uint256 amount);
    /// @dev The caller's credited balance is below the amount.
    /// @param token The asset.
    /// @param balance The caller's balance.
    /// @param amount What was asked for.
    error ChannelHubInsufficientBalance(address token, uint256 balance, uint256 amount);
    /// @dev Withdrawal to the zero address.
    error ChannelHubInvalidRecipient();
    /// @dev Sending ETH failed.
    /// @param to The recipient that refused it.
    /// @param amount How much.
    error ChannelHubEthTransferFailed(address to, uint256 amount);
    /// @dev The final voucher given to `closeByPayee` is not signed by the payer.
    /// @param channelId The channel.
    error ChannelHubInvalidSignature(bytes32 channelId);
    /// @dev The challenge period is over: vouchers no longer settle.
    /// @param channelId The channel.
    /// @param deadline When it ended.
    error ChannelHubChallengeExpired(bytes32 channelId, uint256 deadline);
    /// @dev The final voucher given to `closeByPayee` is above the deposit.
    /// @param channelId The channel.
    /// @param cumulativeAmount The voucher's amount.
    /// @param deposit The channel's deposit.
    error ChannelHubExceedsDeposit(bytes32 channelId, uint256 cumulativeAmount, uint256 deposit);
    /// @dev The `settleBatch` data is cut short or has an empty group.
    /// @param offset Where the bad group starts in the data.
    error ChannelHubMalformedBatch(uint256 offset);

    // ------------------------------------------------------------------------------------------------------------
    // Functions
    // ------------------------------------------------------------------------------------------------------------

    /// @notice Opens a channel from the caller to `payee`, locking `amount` of `token`.
    /// @dev For ETH, `msg.value` must equal `amount`. For fee-on-transfer tokens the deposit is what arrived.
    /// @param payee Who is paid; neither the zero address nor the caller.
    /// @param token The asset; address(0) for ETH.
    /// @param salt Any value that makes the id new (ids are never reused).
    /// @param amount The deposit, in base units.
    /// @return channelId keccak256(abi.encode(msg.sender, payee, token, salt)).
    function open(address payee, address token, bytes32 salt, uint256 amount)
        external
        payable
        returns (bytes32 channelId);

    /// @notice Opens a channel funded from the caller's credited balance of `token` in the hub.
    /// @param payee Who is paid.
    /// @param token The asset; address(0) for ETH.
    /// @param salt Any value that makes the id new.
    /// @param amount The deposit, debited from the caller's balance.
    /// @return channelId keccak256(abi.encode(msg.sender, payee, token, salt)).
    function openFromBalance(address payee, address token, bytes32 salt, uint256 amount)
        external
        returns (bytes32 channelId);

    /// @notice Adds to an open channel's deposit. Anyone may fund any open channel.
    /// @param channelId The channel.
    /// @param amount How much; for ETH, `msg.value` must equal it.
    function topUp(bytes32 channelId, uint256 amount) external payable;

    /// @notice Adds to an open channel's deposit from the caller's credited balance.
    /// @param channelId The channel.
    /// @param amount How much.
    function topUpFromBalance(bytes32 channelId, uint256 amount) external;

    /// @notice Settles vouchers of many channels; callable by anyone, since funds only ever go to payees.
    /// @dev `batch` is a sequence of groups, each `payee (20 bytes) | token (20) | count (2, big-endian, > 0)` followed
    /// by `count` entries of `payer (20) | salt (32) | cumulativeAmount (13, big-endian) | r (32) | vs (32)`, the
    /// signature in EIP-2098 compact form. Skip-not-revert: a bad entry emits `VoucherSkipped` and the rest settles.
    /// @param batch The packed groups.
    function settleBatch(bytes calldata batch) external;

    /// @notice Starts the challenge period of the caller's channel; vouchers still settle until the deadline.
    /// @param channelId The caller's open channel.
    function requestClose(bytes32 channelId) external;

    /// @notice After the challenge period, closes the channel and credits deposit - settled to the payer's balance.
    /// @dev Anyone may call it; the refund only ever goes to the payer.
    /// @param channelId A closing channel whose deadline has passed.
    function finalizeClose(bytes32 channelId) external;

    /// @notice Closes the channel at once, by its payee; optionally settles a final voucher first.
    /// @param channelId The caller's channel (as payee), open or closing.
    /// @param cumulativeAmount The final voucher's amount (ignored with an empty signature).
    /// @param signature The payer's signature of the final voucher, or empty to close without settling.
    function closeByPayee(bytes32 channelId, uint256 cumulativeAmount, bytes calldata signature) external;

    /// @notice Sends part of the caller's credited balance.
    /// @param token The asset; address(0) for ETH.
    /// @param amount How much; more than zero.
    /// @param to The recipient; not the zero address.
    function withdraw(address token, uint256 amount, address to) external;

    /// @notice The credited balance of `account` in `token`.
    /// @param account Whose.
    /// @param token The asset; address(0) for ETH.
    /// @return The balance, in base units.
    function balanceOf(address account, address token) external view returns (uint256);

    /// @notice Everything known about a channel; `status` is `None` for an id never opened.
    /// @param channelId The channel.
    /// @return The channel's parties, amounts, deadline and status.
    function channel(bytes32 channelId) external view returns (ChannelView memory);

    /// @notice The id a channel opened by `payer` with these parameters has (or would have).
    /// @param payer Who opens it.
    /// @param payee Who is paid.
    /// @param token The asset.
    /// @param salt The payer's salt.
    /// @return keccak256(abi.encode(payer, payee, token, salt)).
    function channelIdOf(address payer, address payee, address token, bytes32 salt) external pure returns (bytes32);

    /// @notice The EIP-712 digest the payer signs for a voucher.
    /// @param channelId The channel.
    /// @param cumulativeAmount The channel's new cumulative total.
    /// @return The digest.
    function hashVoucher(bytes32 channelId, uint256 cumulativeAmount) external view returns (bytes32);

    /// @notice The EIP-712 domain separator of this hub on this chain.
    /// @return The separator.
    function domainSeparator() external view returns (bytes32);

    /// @notice Seconds between `requestClose` and the moment the payer may finalize.
    /// @return The challenge period.
    function challengePeriod() external view returns (uint256);
}
